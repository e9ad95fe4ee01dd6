"""Tiny generated data for the data-layer tests: every awkward image kind, folders, shards."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# A protocol-0 pickle that would create MARKER if anything unpickled it. Written as bytes by hand:
# the tests never import pickle.
PICKLE_MARKER_NAME = "unpickled.marker"


def pickle_payload(marker: Path) -> bytes:
    return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()


def solid(color: tuple[int, ...], size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def encode(img: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def distinct_color(i: int) -> tuple[int, int, int]:
    return ((37 * i) % 256, (91 * i + 50) % 256, (173 * i + 20) % 256)


def textured(i: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """An RGB image whose pixels depend on i and position, so crops and flips are visible."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    r, g, b = distinct_color(i)
    pixels = np.stack([(x * 5 + r) % 256, (y * 7 + g) % 256, (x + y + b) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20 (W x H), left half red, right half blue, EXIF orientation 6 (rotate 90 CW to
    display): displayed 20x40 with red on top, blue at the bottom."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def rgba_with_hidden_colour() -> bytes:
    """Left half fully transparent but green underneath; right half half-transparent red."""
    img = Image.new("RGBA", (32, 32), (0, 255, 0, 0))
    img.paste((255, 0, 0, 128), (16, 0, 32, 32))
    return encode(img)


def gray_alpha() -> bytes:
    return encode(Image.new("LA", (32, 32), (0, 0)))


def palette_transparency() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 255, 0] + [200, 200, 200] * 255)
    return encode(img, transparency=0)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)


def gray_16_bit(value: int = 40000) -> bytes:
    return encode(Image.fromarray(np.full((32, 32), value, dtype=np.uint16)))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_by_hand(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw_rows)) + _png_chunk(b"IEND", b""))


def rgb_16_bit(value: int = 40000, size: int = 32) -> bytes:
    row = b"\x00" + struct.pack(">H", value) * 3 * size
    return png_by_hand(size, size, 16, 2, row * size)


def decompression_bomb(side: int = 30000) -> bytes:
    """A PNG header that declares side x side pixels with almost no data: must be refused unopened."""
    return png_by_hand(side, side, 8, 0, b"\x00" * 64)


def truncated_jpeg() -> bytes:
    data = encode(textured(1, (64, 64)), "JPEG", quality=90)
    return data[: len(data) // 2]


# ----- folders and shards ----------------------------------------------------------------------------


def make_image_folder(root: Path, n: int, *, size: tuple[int, int] = (48, 40)) -> dict[str, str]:
    """n PNGs with sidecar captions, half of them in a subfolder. Returns key -> caption."""
    captions = {}
    for i in range(n):
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        textured(i, size).save(sub / f"img{i:03d}.png")
        (sub / f"img{i:03d}.txt").write_text(f"caption {i}\n", encoding="utf-8")
        captions[(f"sub/img{i:03d}" if i % 2 else f"img{i:03d}")] = f"caption {i}"
    return captions


MIXED_SHAPES = {"portrait": (96, 160), "landscape": (160, 96), "panorama": (320, 64), "square": (128, 128),
                "tiny": (24, 20)}
"""(W, H) of each kind in `make_mixed_shape_folder`."""


def make_mixed_shape_folder(root: Path, counts: dict[str, int]) -> dict[str, tuple[int, int]]:
    """`counts[kind]` PNGs of each MIXED_SHAPES kind, with sidecar captions. Returns key -> (W, H)."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for kind, n in counts.items():
        for i in range(n):
            key = f"{kind}{i:03d}"
            textured(len(sizes), MIXED_SHAPES[kind]).save(root / f"{key}.png")
            (root / f"{key}.txt").write_text(f"a {kind} picture {i}", encoding="utf-8")
            sizes[key] = MIXED_SHAPES[kind]
    return sizes


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    """``members`` (name, bytes) in order; ``mode`` "w:gz" for a gzipped tarball."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_members(start: int, n: int, prefix: str = "s") -> list[tuple[str, bytes]]:
    members = []
    for i in range(start, start + n):
        members.append((f"{prefix}{i:05d}.png", encode(textured(i))))
        members.append((f"{prefix}{i:05d}.txt", f"caption {i}".encode()))
    return members


def make_shards(root: Path, n_shards: int, per_shard: int) -> list[Path]:
    return [write_tar(root / f"shard-{s:06d}.tar", good_members(s * per_shard, per_shard)) for s in range(n_shards)]
