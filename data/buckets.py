"""Aspect-ratio buckets: a list of (width, height) training sizes, the nearest one for an image, and
resizing an image to cover a bucket with the smallest crop.

Every bucket side is a multiple of 64 px: the latent is 1/8 of the image (the VAE) and the UNet
halves it three more times, so 8 x 8 = 64 keeps every level an integer size (SD 1.x/2.x and SDXL
alike; a smaller model may need less, never more). `--data.buckets` takes a preset name or
explicit `WxH` sizes:

    sdxl        SDXL's training buckets (Podell et al. 2023, appendix; 1:4 to 4:1, 1024**2 pixels),
                scaled to the pixel area resolution**2, sides rounded to multiples of 64
    512x768     an explicit bucket (several may be given; presets and sizes may be mixed)

An image goes to the bucket whose aspect ratio is nearest in log space (so 2:1 and 1:2 are equally
far from 1:1), is resized to cover it and cropped along the one side that is too long; the crop's
top-left corner in the resized image is recorded, as SDXL conditions on it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BUCKET_MULTIPLE = 64
"""Bucket sides are multiples of this (VAE factor 8 x UNet factor 8)."""

# SDXL's buckets at 1024 x 1024 pixels, (width, height); only their aspect ratios are used.
SDXL_1024 = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576),
    (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
PRESETS = {"sdxl": SDXL_1024}
SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
SHARD_TAG = re.compile(r"-b(\d+)x(\d+)-")

Bucket = tuple[int, int]
"""(width, height) in pixels."""


def _round_to_multiple(value: float) -> int:
    return max(BUCKET_MULTIPLE, BUCKET_MULTIPLE * round(value / BUCKET_MULTIPLE))


def at_area(sizes: tuple[Bucket, ...], resolution: int) -> list[Bucket]:
    """The 1024**2-pixel sizes scaled to `resolution**2` pixels, sides rounded to multiples of 64
    (at resolution 1024 exactly SDXL's list; smaller areas merge neighbouring ratios)."""
    scale = resolution / 1024
    return [(_round_to_multiple(w * scale), _round_to_multiple(h * scale)) for w, h in sizes]


def bucket_problems(entries: tuple[str, ...]) -> list[str]:
    """Sentence fragments for entries that are neither a preset nor WxH with multiples of 64."""
    out = []
    for entry in entries:
        if entry.strip().lower() in PRESETS:
            continue
        match = SIZE.match(entry)
        if match is None:
            out.append(f"buckets entry {entry!r} must be a preset ({', '.join(PRESETS)}) or WIDTHxHEIGHT like 512x768")
        elif any(int(v) < BUCKET_MULTIPLE or int(v) % BUCKET_MULTIPLE for v in match.groups()):
            out.append(f"bucket {entry!r} needs sides that are multiples of {BUCKET_MULTIPLE} (the VAE x UNet factor)")
    return out


def resolve_buckets(entries: tuple[str, ...], resolution: int) -> list[Bucket]:
    """The bucket list, deduplicated and sorted by aspect ratio (empty: no bucketing)."""
    found: list[Bucket] = []
    for entry in entries:
        preset = PRESETS.get(entry.strip().lower())
        if preset is not None:
            found.extend(at_area(preset, resolution))
        else:
            w, h = SIZE.match(entry).groups()  # type: ignore[union-attr]  # checked by bucket_problems
            found.append((int(w), int(h)))
    return sorted(set(found), key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(buckets: list[Bucket], height: int, width: int) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to width / height."""
    ratio = math.log(max(width, 1) / max(height, 1))
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def shard_tag(bucket: Bucket) -> str:
    """The part of a bucketed shard's file name that names its bucket: `shard-b512x768-000000.tar`."""
    return f"b{bucket[0]}x{bucket[1]}"


def bucket_of_shard(name: str) -> Bucket | None:
    match = SHARD_TAG.search(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def cover_crop_resize(img: Image.Image, bucket: Bucket, u_x: float, u_y: float, *, flip: bool = False,
                      resample: str = "bicubic") -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover `bucket` (scale = max(W_b / W, H_b / H)) and crop the excess along one side at
    relative offset (u_x, u_y). Returns float32 [3, H_b, W_b] in [-1, 1] and the crop's (top, left) in
    the resized image. The crop is cut from the original first (so only kept pixels are resized)."""
    width, height = img.size
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))  # the resized size
    left, top = round(u_x * (rw - bw)), round(u_y * (rh - bh))
    box = (round(left * width / rw), round(top * height / rh),
           round((left + bw) * width / rw), round((top + bh) * height / rh))
    region = torch.from_numpy(np.array(img.crop(box), dtype=np.uint8))
    pixels = region.permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w] uint8
    if pixels.shape[-2:] != (bh, bw):
        pixels = F.interpolate(pixels, size=(bh, bw), mode=resample, antialias=True)
    if flip:
        pixels = pixels.flip(-1)
    return pixels[0].float().mul_(1.0 / 127.5).sub_(1.0), (top, left)
