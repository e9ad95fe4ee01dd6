"""From a raw record (bytes + stored caption) to the one sample format every source produces.

A sample: {"image": float32 [3, H, W] in [-1, 1], "caption": str, "key": str, "original_size": (H, W),
"crop_top_left": (top, left)} (the crop's corner in the resized image, SDXL's c_crop conditioning).
Square by default; with a bucket (W_b, H_b) the image is resized to cover it (data/buckets.py).

All per-sample randomness (crop position, flip, choice among list captions, tag order) comes from
a generator seeded by (seed, epoch, sample identity), never from a global or per-worker RNG, so a
sample looks the same whatever the worker count, process count or resume point.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.buckets import cover_crop_resize
from data.captions import resolve_caption
from data.config import DataConfig
from data.decode import BadSample, decode_rgb


@dataclass
class RawRecord:
    """One stored sample before decoding. `origin` names its shard, folder or dataset for messages."""

    key: str
    origin: str
    image: bytes | None = None
    caption: object = None
    metadata: dict[str, Any] = field(default_factory=dict)
    problem: tuple[str, str] | None = None
    """(reason, message) when the record is known to be unusable before decoding (e.g. missing file)."""


@dataclass(frozen=True)
class SampleDraws:
    """The uniform numbers in [0, 1) that one sample's augmentation uses, drawn in a fixed order."""

    crop_x: float
    crop_y: float
    flip: float
    caption: float
    tags: int | None = None
    """64-bit seed of the tag shuffle (data/captions.py); None: tags keep their order."""


def sample_draws(seed: int, epoch: int, identity: int | str) -> SampleDraws:
    """Draws for one sample from a generator seeded by (seed, epoch, identity) alone."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{identity}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    return SampleDraws(rng.random(), rng.random(), rng.random(), rng.random(), rng.getrandbits(64))


CENTER_DRAWS = SampleDraws(0.5, 0.5, 1.0, 0.0)
"""Centre crop, never flipped, first list caption: one record's fixed view (the emoji classifier's). Single
passes (`iterate_once`: statistics, validation, cache builds) also centre-crop unflipped, but pick a list
caption with each sample's own draws, as training does."""


def decode_record(record: RawRecord, cfg: DataConfig, *, draft_min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """The record's image as upright 8-bit RGB plus its original (H, W); raises BadSample."""
    if record.problem is not None:
        raise BadSample(*record.problem)
    if record.image is None:
        raise BadSample("missing_image", "the sample has no image member or column")
    return decode_rgb(
        record.image,
        formats=cfg.image_formats,
        max_pixels=cfg.max_image_pixels,
        background=cfg.background,
        draft_min_side=draft_min_side,
        min_side=cfg.min_image_side,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )


def make_sample(record: RawRecord, cfg: DataConfig, draws: SampleDraws, *, augment: bool = True,
                bucket: tuple[int, int] | None = None) -> dict[str, Any]:
    """Decode, resize the shorter side, crop a square (or cover `bucket` (W, H) and crop the excess),
    maybe flip. `augment=False`: centre, no flip."""
    if record.problem is not None:
        raise BadSample(*record.problem)
    # The caption first: a sample skipped for its caption costs no image decode.
    caption = resolve_caption(record.caption, missing=cfg.missing_caption, choice=draws.caption,
                              tags=cfg.tag_shuffle(), tag_seed=draws.tags if augment else None)
    draft = (cfg.resolution if bucket is None else max(bucket)) if cfg.jpeg_draft else None
    img, original_size = decode_record(record, cfg, draft_min_side=draft)
    original_size = stored_original_size(record) or original_size
    random_crop = augment and cfg.crop == "random"
    u_x, u_y = (draws.crop_x, draws.crop_y) if random_crop else (0.5, 0.5)
    flip = augment and cfg.flip and draws.flip < 0.5
    if bucket is None:
        image = crop_resize(img, cfg.resolution, u_x, u_y, flip=flip, resample=cfg.resample)
        crop_top_left = square_crop_top_left(img.size, cfg.resolution, u_x, u_y)
    else:
        image, crop_top_left = cover_crop_resize(img, bucket, u_x, u_y, flip=flip, resample=cfg.resample)
    return {"image": image, "caption": caption, "key": record.key, "original_size": original_size,
            "crop_top_left": crop_top_left}


def square_crop_top_left(size: tuple[int, int], resolution: int, u_x: float, u_y: float) -> tuple[int, int]:
    """(top, left) of `crop_resize`'s square in the image resized to a shorter side of `resolution`."""
    width, height = size
    side = min(width, height)
    left, top = round(u_x * (width - side)), round(u_y * (height - side))
    return round(top * resolution / side), round(left * resolution / side)


def stored_original_size(record: RawRecord) -> tuple[int, int] | None:
    """The source image's (H, W) that prepare_data stored in a shard's .json, when present and sane:
    the shard image itself may have been downscaled."""
    size = record.metadata.get("original_size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return size[0], size[1]
    return None


def crop_resize(img: Image.Image, resolution: int, u_x: float, u_y: float, *, flip: bool = False,
                resample: str = "bicubic") -> torch.Tensor:
    """Cut the largest centred-or-offset square, resize it to `resolution`, maybe mirror it.

    Same as "resize the shorter side to `resolution`, then crop": the square's side is the shorter
    side, placed at relative offset (u_x, u_y) along the longer one. Resizing runs on the uint8
    tensor with torch's antialiased kernels, which match PIL's filters to within one grey level and
    are a few times faster. Returns float32 [3, resolution, resolution] in [-1, 1].
    """
    width, height = img.size
    side = min(width, height)
    left, top = round(u_x * (width - side)), round(u_y * (height - side))
    square = torch.from_numpy(np.array(img.crop((left, top, left + side, top + side)), dtype=np.uint8))
    pixels = square.permute(2, 0, 1).unsqueeze(0)  # [1, 3, side, side] uint8, channels-last strides
    if side != resolution:
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode=resample, antialias=True)
    if flip:
        pixels = pixels.flip(-1)
    return pixels[0].float().mul_(1.0 / 127.5).sub_(1.0)

