"""Safe image decoding: refuse what should not be opened, and turn every image mode into 8-bit RGB.

The order matters: the header is parsed (format restricted, no pixels yet), the declared size is
checked against the pixel limit, then pixels are decoded, EXIF orientation applied, and the mode
converted. Anything that goes wrong raises `BadSample` with a short reason that the loader counts.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadSample(Exception):
    """One sample that cannot be used. `reason` is a short stable name used for counting."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message or reason


# 16-bit (and 32-bit integer) grey modes. PIL's convert("L") clips these at 255, so 40000 would
# become white; we rescale the full range instead (40000 * 255 / 65535 = 155.6).
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Modes that carry an alpha channel (premultiplied ones included: convert("RGBA") un-premultiplies).
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def open_image(data: bytes, *, formats: tuple[str, ...], max_pixels: int) -> Image.Image:
    """Parse the header only and refuse decompression bombs before a single pixel is decoded."""
    with warnings.catch_warnings():
        # PIL warns above its own global limit; ours is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(formats))
        except UnidentifiedImageError as e:
            raise BadSample("not_an_image", f"not a {'/'.join(formats)} image ({len(data)} bytes)") from e
        except Image.DecompressionBombError as e:
            raise BadSample("decompression_bomb", str(e)) from e
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
            raise BadSample("corrupt_image", f"unreadable header: {e}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise BadSample(
            "decompression_bomb",
            f"declares {width}x{height} = {width * height} pixels, over max_image_pixels={max_pixels}",
        )
    return img


def decode_rgb(
    data: bytes,
    *,
    formats: tuple[str, ...],
    max_pixels: int,
    background: tuple[int, int, int],
    draft_min_side: int | None = None,
    min_side: int = 1,
    max_aspect_ratio: float = float("inf"),
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes into an 8-bit RGB PIL image, upright, transparency composited.

    Returns the image and the original size (H, W) as displayed (after EXIF orientation, before any
    draft reduction). `draft_min_side`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as its
    shorter side stays at least this long (libjpeg scales in the DCT domain, which is far cheaper).
    Images smaller than `min_side` or more elongated than `max_aspect_ratio` are refused from the header.
    """
    img = open_image(data, formats=formats, max_pixels=max_pixels)
    original_size = _displayed_size(img)
    check_shape(original_size, min_side=min_side, max_aspect_ratio=max_aspect_ratio)
    try:
        if draft_min_side and img.format == "JPEG":
            img.draft(None, (draft_min_side, draft_min_side))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img, background), original_size
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("decompression_bomb", str(e)) from e
    except OSError as e:
        reason = "truncated_image" if "truncated" in str(e) else "corrupt_image"
        raise BadSample(reason, str(e)) from e
    except (SyntaxError, ValueError, struct.error, EOFError, zlib.error, IndexError) as e:
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from e


def check_shape(size: tuple[int, int], *, min_side: int, max_aspect_ratio: float) -> None:
    """Refuse tiny and extremely elongated images: a 1x4000 strip cannot give a square training crop."""
    height, width = size
    if min(height, width) < min_side:
        raise BadSample("too_small", f"{width}x{height} is below min_image_side={min_side}")
    if max(height, width) > max_aspect_ratio * min(height, width):
        raise BadSample("extreme_aspect", f"{width}x{height} exceeds max_aspect_ratio={max_aspect_ratio}")


def _displayed_size(img: Image.Image) -> tuple[int, int]:
    """(H, W) after EXIF orientation: orientations 5-8 swap width and height."""
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not lose the image; its pixels are still fine
        orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels show `background`, whatever colour they hid."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in SIXTEEN_BIT_MODES:
        return Image.merge("RGB", [_rescale_16_bit(img)] * 3)
    if mode == "F":
        raise BadSample("unsupported_mode", "floating-point images have no agreed display range")
    if mode in ALPHA_MODES or "transparency" in img.info:
        return composite_on(img.convert("RGBA"), background)
    return img.convert("RGB")


def _rescale_16_bit(img: Image.Image) -> Image.Image:
    """uint16 grey [H, W] -> uint8 grey by scaling 0..65535 onto 0..255 (rounded, not clipped)."""
    values = np.asarray(img).astype(np.float32)
    scaled = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


def composite_on(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-blend RGBA over a solid colour: out = a * rgb + (1 - a) * background."""
    out = Image.new("RGB", rgba.size, tuple(int(c) for c in background))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
