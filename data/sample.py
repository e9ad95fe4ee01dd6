"""From a raw record (bytes + stored caption) to the one sample format every source produces.

A sample: {"image": float32 [3, H, W] in [-1, 1], "caption": str, "key": str, "original_size": (H, W)}.

All per-sample randomness (crop position, flip, choice among list captions) comes from a generator
seeded by (seed, epoch, sample identity), never from a global or per-worker RNG, so a sample looks
the same whatever the worker count, process count or resume point.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

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


def sample_draws(seed: int, epoch: int, identity: int | str) -> SampleDraws:
    """Draws for one sample from a generator seeded by (seed, epoch, identity) alone."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{identity}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    return SampleDraws(rng.random(), rng.random(), rng.random(), rng.random())


CENTER_DRAWS = SampleDraws(0.5, 0.5, 1.0, 0.0)
"""Centre crop, never flipped, first list caption: the deterministic view for statistics and validation."""


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


def make_sample(record: RawRecord, cfg: DataConfig, draws: SampleDraws, *, augment: bool = True) -> dict[str, Any]:
    """Decode, resize the shorter side, crop a square, maybe flip. `augment=False`: centre, no flip."""
    if not augment:
        draws = SampleDraws(0.5, 0.5, 1.0, draws.caption)
    if record.problem is not None:
        raise BadSample(*record.problem)
    # The caption first: a sample skipped for its caption costs no image decode.
    caption = resolve_caption(record.caption, missing=cfg.missing_caption, choice=draws.caption)
    img, original_size = decode_record(record, cfg, draft_min_side=cfg.resolution if cfg.jpeg_draft else None)
    original_size = stored_original_size(record) or original_size
    random_crop = augment and cfg.crop == "random"
    img = resize_crop(img, cfg.resolution, draws.crop_x if random_crop else 0.5, draws.crop_y if random_crop else 0.5)
    if augment and cfg.flip and draws.flip < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return {"image": to_tensor(img), "caption": caption, "key": record.key, "original_size": original_size}


def stored_original_size(record: RawRecord) -> tuple[int, int] | None:
    """The source image's (H, W) that prepare_data stored in a shard's .json, when present and sane:
    the shard image itself may have been downscaled."""
    size = record.metadata.get("original_size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return size[0], size[1]
    return None


def resize_crop(img: Image.Image, resolution: int, u_x: float, u_y: float) -> Image.Image:
    """Resize the shorter side to `resolution` and cut a square at relative offset (u_x, u_y).

    Done as one resize of the crop box in source coordinates, so a 4000-pixel panorama is never
    materialised at full width. Bicubic with PIL's antialiasing on downscales.
    """
    width, height = img.size
    scale = resolution / min(width, height)
    scaled_w = max(resolution, round(width * scale))
    scaled_h = max(resolution, round(height * scale))
    x0 = round(u_x * (scaled_w - resolution))
    y0 = round(u_y * (scaled_h - resolution))
    box = (x0 / scale, y0 / scale, (x0 + resolution) / scale, (y0 + resolution) / scale)
    return img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [H, W, 3] uint8
    return pixels.permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)
