"""Latent cache with buckets and list captions: bytes per image for one caption vs three (all distinct,
or two of three equal), and cached read throughput of a bucketed cache (CachedPlannedLoader) vs a
square one (CachedLatentLoader). CPU; prints numbers only, no assertions.

    nice -n 15 .venv/bin/python -m benchmarks.cache_buckets [--images 48] [--batches 40]

The demo's stages as in benchmarks/cache_build.py: the `small` autoencoder preset (random weights,
f4: a 64 px square is a 4x16x16 latent) and the `minilm` text encoder at 77 tokens, latents in
fp32, text stored in bf16, flips on. Images: mixed shapes (portrait 96x160, landscape 160x96,
panorama 320x64, square 128x128, tiny 24x20) in equal numbers; square caches at 64 px, bucketed
ones with buckets 64x64, 128x64, 64x128 (so a bucketed image has up to twice the square's latent).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import data
from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from autoencoder.frozen import FrozenEncoder
from benchmarks.cache_build import read_rate
from ldm.cache import CacheSpec, build_cache, open_cache
from text_encoder import load_text_encoder

SHAPES = {"portrait": (96, 160), "landscape": (160, 96), "panorama": (320, 64), "square": (128, 128), "tiny": (24, 20)}
BUCKETS = ("64x64", "128x64", "64x128")


def make_images(folder: Path, n: int, captions: str) -> None:
    """n gradient PNGs of the five shapes; captions "one" (.txt), "three" (a JSONL list of three distinct)
    or "three_dup" (three entries, two equal)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        kind = list(SHAPES)[i % len(SHAPES)]
        w, h = SHAPES[kind]
        yy, xx = np.mgrid[:h, :w]
        r, g, b = rng.integers(0, 256, size=3)
        pixels = np.stack([(xx * 3 + r) % 256, (yy * 3 + g) % 256, (xx + yy + b) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.png")
        first = f"a {kind} gradient number {i} in colour {i % 7}"
        if captions == "one":
            (folder / f"img{i:05d}.txt").write_text(first, encoding="utf-8")
            continue
        third = first if captions == "three_dup" else f"{kind}, gradient, colour {i % 7}, number {i}"
        rows.append({"file_name": f"img{i:05d}.png", "text": [first, f"a picture of stripes, number {i}", third]})
    if rows:
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def build(root: Path, name: str, cfg: data.DataConfig, vae: FrozenEncoder, text) -> CacheSpec:
    spec = CacheSpec(data=cfg, cache_dir=root / name, vae_fingerprint={"weights_sha256": "benchmark"},
                     text_fingerprint=text.fingerprint, verify_sha256=False)
    start = time.perf_counter()
    build_cache(spec, vae=vae, text_encoder=text, rank=0, world_size=1, barrier=lambda: None)
    print(f"  built {name} in {time.perf_counter() - start:.1f} s")
    return spec


def bytes_per_image(spec: CacheSpec) -> tuple[float, float]:
    """(all shard bytes, of which text embeddings) per image."""
    cache = open_cache(spec.cache_dir, spec.key, verify_sha256=False)
    total = sum(info["bytes"] for name, info in cache.manifest["files"].items() if name.startswith("rank"))
    text = sum(s["num_texts"] for s in cache.manifest["shards"]) * int(np.prod(cache.null_hidden.shape[1:])) * 2
    return total / len(cache), text / len(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = FrozenEncoder(build_autoencoder(AUTOENCODER_PRESETS["small"]).eval().requires_grad_(False))
    text = load_text_encoder("minilm")  # 77 tokens, 384 wide
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, flips on")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        specs: dict[str, CacheSpec] = {}
        for captions in ("one", "three", "three_dup"):
            make_images(root / captions, args.images, captions)
            base: dict[str, Any] = dict(source=str(root / captions), resolution=64, crop="center", flip=True)
            specs[f"square/{captions}"] = build(root, f"square-{captions}", data.DataConfig(**base), vae, text)
            if captions == "one":
                specs["buckets/one"] = build(root, "buckets-one", data.DataConfig(**base, buckets=BUCKETS), vae, text)
        for name, spec in specs.items():
            total, text_part = bytes_per_image(spec)
            print(f"  {name:>17}: {total:9,.0f} B/image, of which text {text_part:9,.0f}")
        for name in ("square/one", "buckets/one"):
            print(f"  read {name:>12} (batch 32, text): in memory {read_rate(specs[name], True, args.batches):7,.0f} "
                  f"samples/s, streamed {read_rate(specs[name], False, args.batches):7,.0f} samples/s")


if __name__ == "__main__":
    main()
