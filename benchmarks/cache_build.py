"""Latent cache: build speed (before / now in fp32 / now in bf16), bytes per image, read speed, and
the cost of the data-file fingerprint on a large folder. CPU; prints numbers only, no assertions.

    .venv/bin/python -m benchmarks.cache_build [--images 256] [--rounds 3] [--distinct-captions 0]
                                               [--fingerprint-files 20000] [--skip-clip768]

Build: the demo's stages (the `minilm` text encoder at 77 tokens, the `small` autoencoder preset at
64 px, random weights: speed, not quality, matters here) over generated 80x64 PNGs with captions,
flips on, one process. Variants, interleaved round by round so load from other jobs on the shared
machine hits all of them alike (compare the ratios, not the absolute numbers):

  before      the build as it was (replayed here): the plain autoencoder, plain and flipped views in
              two calls under no_grad, every caption encoded, fp32, text stored in fp32, batch 32
  now fp32    what train_ldm runs now: `autoencoder.frozen.FrozenEncoder` (channels-last) with both
              views in one call, inference mode, the text encoder encoding each distinct caption once,
              text stored in bf16, batch 32
  now w1      the same with one DataLoader worker decoding images beside the encoders
  now bf16    the same with both encoders in bf16 (what `dtype=auto` picks on AMX CPUs and GPUs; on a
              CPU with AVX512-BF16 alone bf16 matrix work is slower, see text_encoder/precision.py)

Also: bytes per cached image for the demo encoder (77x384) and a 768-wide CLIP-shaped tiny encoder
(77x768, random 2-layer CLIPTextModel) in fp32 and bf16 text storage; read throughput of
CachedLatentLoader in memory and streamed (memory-mapped shards, page cache warm); and the time
`data_files_fingerprint` takes over a folder of N tiny image + caption files.

Measured on the shared 2-core CPU (AVX512-BF16, no AMX; load 9-10 from other jobs, so absolute
rates are ~15x below an idle machine's; torch 2.14.1), 64 images, 2 interleaved rounds:
  before 3.4 img/s; now fp32 4.0 img/s = 1.19x wall (1.18x per CPU-second); now w1 0.98x;
  now bf16 0.99x (bf16 matrix work without AMX is slower than fp32, so dtype=auto keeps fp32 here).
  Bytes per image (latents with flips at 64 px + text): before 134,739, now 75,604 (77x384 text in
  bf16); 768-wide CLIP: 253,012 in fp32 text, 134,740 in bf16. Data-file fingerprint: 20,000 images
  + 20,000 captions in 0.88 s (22 us per file, page cache warm).
  Again 2026-12-02 (64 images, 2 rounds, one thread, load ~8): before 23.3 img per CPU-second, now
  fp32 24.0 (1.03x), now w1 1.00x, now bf16 0.91x; a build's CPU time: autoencoder 44%, text encoder
  51%, decoding/collating/other 5%, shard writing and casts ~0%. Both forwards are what the cache
  exists to run once, already without autograd and deduplicated, so on this CPU the build is at its
  floor; the lever left is bf16 where the hardware has AMX or a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import data
import ldm.cache.build as build_module
from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from autoencoder.frozen import FrozenEncoder
from ldm.cache import CacheSpec, build_cache, cached_loader, data_files_fingerprint, open_cache
from ldm.cache.encode import EncodedBatch
from text_encoder import load_text_encoder

RESOLUTION = 64


def make_images(folder: Path, n: int, distinct_captions: int = 0) -> None:
    """n gradient PNGs (80x64, so the loader resizes and crops) with captions; `distinct_captions` > 0
    repeats that many captions (as alt texts repeat in scraped data), 0 makes every caption unique."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    for i in range(n):
        r, g, b = rng.integers(0, 256, size=3)
        pixels = np.stack([(xx * 3 + r) % 256, (yy * 3 + g) % 256, (xx + yy + b) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.png")
        k = i % distinct_captions if distinct_captions else i
        (folder / f"img{i:05d}.txt").write_text(f"a gradient number {k} in colour {k % 7} {k % 5}", encoding="utf-8")


@torch.no_grad()
def legacy_encode_batch(batch: dict[str, Any], vae, text_encoder, spec: CacheSpec) -> EncodedBatch:
    """The build's per-batch encoding before issue 18: two autoencoder calls, every caption, fp32."""
    pixels = batch["pixel_values"].to(vae.device, vae.dtype)
    out = {}
    for suffix, x in ({"": pixels, "_flip": pixels.flip(-1)} if spec.data.flip else {"": pixels}).items():
        posterior = vae.encode(x).latent_dist
        out[f"latent_mean{suffix}"], out[f"latent_std{suffix}"] = posterior.mean, posterior.std
    latents = {k: v.to("cpu", torch.float32).contiguous() for k, v in out.items()}
    if text_encoder is None:
        return EncodedBatch(latents, None)
    hidden = text_encoder.encode(list(batch["captions"])).hidden.to("cpu", torch.float32)
    return EncodedBatch(latents, {c: hidden[i] for i, c in enumerate(batch["captions"])})


def timed_build(spec: CacheSpec, vae, text_encoder, legacy: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to build `spec` from scratch (the folder is cleared first)."""
    for path in spec.cache_dir.glob("*") if spec.cache_dir.is_dir() else []:
        path.unlink()
    real = build_module.encode_batch
    build_module.encode_batch = legacy_encode_batch if legacy else real
    try:
        start, cpu = time.perf_counter(), time.process_time()
        build_cache(spec, vae=vae, text_encoder=text_encoder, rank=0, world_size=1, barrier=lambda: None)
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        build_module.encode_batch = real


def build_breakdown(spec: CacheSpec, vae: FrozenEncoder, text_encoder) -> dict[str, float]:
    """CPU seconds of this process per phase of one build of `spec`: the autoencoder's encoder, the text
    encoder, the rest of `encode_batch` (casts, copies), shard writing, and everything else (reading and
    decoding images, collating, planning)."""
    spent: dict[str, float] = {}

    def timed(label: str, fn):
        def wrapper(*args, **kwargs):
            cpu = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.process_time() - cpu
        return wrapper

    saved = vae.encode, text_encoder.encode, build_module.encode_batch, build_module.ShardWriter.add
    vae.encode, text_encoder.encode = timed("autoencoder", saved[0]), timed("text encoder", saved[1])
    build_module.encode_batch = timed("encode_batch", saved[2])
    build_module.ShardWriter.add = timed("shard writing", saved[3])
    try:
        _, total = timed_build(spec, vae, text_encoder)
    finally:
        vae.encode, text_encoder.encode, build_module.encode_batch, build_module.ShardWriter.add = saved
    spent["casts/copies"] = spent.pop("encode_batch") - spent["autoencoder"] - spent["text encoder"]
    spent["decode/collate/other"] = total - sum(spent.values())
    return {"total": total, **spent}


def bytes_per_image(spec: CacheSpec) -> float:
    manifest = open_cache(spec.cache_dir, spec.key, verify_sha256=False).manifest
    shard_bytes = sum(info["bytes"] for name, info in manifest["files"].items() if name.startswith("rank"))
    return shard_bytes / manifest["num_samples"]


def read_rate(spec: CacheSpec, in_memory: bool, batches: int = 40) -> float:
    """Samples per second of the cache's training loader (batch 32, text included) after two warm-up batches."""
    loader = cached_loader(open_cache(spec.cache_dir, spec.key, verify_sha256=False, in_memory=in_memory),
                           spec.data, batch_size=32, seed=0)
    for _ in range(2):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * 32 / (time.perf_counter() - start)


def clip768_encoder(folder: Path):
    """A random 2-layer CLIPTextModel, 768 wide, 77 tokens (open_clip's vocabulary), loaded through hf:."""
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    from text_encoder.openclip_backend import clip_tokenizer_from_open_clip

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
                            max_position_embeddings=77)
    CLIPTextModel(config).save_pretrained(folder)
    clip_tokenizer_from_open_clip(open_clip.get_tokenizer("ViT-B-32"), 77).save_pretrained(folder)
    return load_text_encoder(f"hf:{folder}")


def fingerprint_cost(root: Path, n: int) -> tuple[float, float]:
    """(seconds to write n tiny PNG + caption pairs, median seconds of data_files_fingerprint over 3 calls)."""
    tiny = Image.new("RGB", (16, 16), (10, 20, 30))
    start = time.perf_counter()
    for i in range(n):
        sub = root / f"part{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        tiny.save(sub / f"{i:06d}.png")
        (sub / f"{i:06d}.txt").write_text("a tiny square", encoding="utf-8")
    written = time.perf_counter() - start
    cfg = data.DataConfig(source=str(root), resolution=16)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        data_files_fingerprint(cfg)
        times.append(time.perf_counter() - start)
    return written, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every build variant")
    parser.add_argument("--distinct-captions", type=int, default=0, help="0: every caption unique")
    parser.add_argument("--fingerprint-files", type=int, default=20000, help="image files for the fingerprint cost")
    parser.add_argument("--skip-clip768", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = build_autoencoder(AUTOENCODER_PRESETS["small"]).eval().requires_grad_(False)
    text = load_text_encoder("minilm")  # 77 tokens, 384 wide: the demo's encoder
    text16 = load_text_encoder("minilm", dtype="bf16")
    frozen, frozen16 = FrozenEncoder(vae), FrozenEncoder(vae, dtype=torch.bfloat16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.images} images at {RESOLUTION} px, flips on, captions "
          f"{'all distinct' if not args.distinct_captions else f'{args.distinct_captions} distinct'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "images", args.images, args.distinct_captions)
        cfg = data.DataConfig(source=str(root / "images"), resolution=RESOLUTION, crop="center", flip=True)

        def spec(name: str, **changes: Any) -> CacheSpec:
            return CacheSpec(data=cfg, cache_dir=root / name, vae_fingerprint={"weights_sha256": "benchmark"},
                             text_fingerprint=text.fingerprint, verify_sha256=False).replace(**changes)

        variants = {  # name: (spec, image encoder, text encoder, legacy)
            "before": (spec("before", text_dtype="float32"), vae, text, True),
            "now fp32": (spec("fp32"), frozen, text, False),
            "now w1": (spec("w1", num_workers=1), frozen, text, False),
            "now bf16": (spec("bf16", text_fingerprint=text16.fingerprint), frozen16, text16, False),
        }
        for s, image_encoder, text_encoder, legacy in variants.values():  # warm-up: oneDNN kernels, tokenizer
            timed_build(s, image_encoder, text_encoder, legacy)
        seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (s, image_encoder, text_encoder, legacy) in variants.items():
                seconds[name].append(timed_build(s, image_encoder, text_encoder, legacy))
        wall = {name: statistics.median(v[0] for v in values) for name, values in seconds.items()}
        cpu = {name: statistics.median(v[1] for v in values) for name, values in seconds.items()}
        for name, values in seconds.items():
            print(f"  build {name:>9}: {args.images / wall[name]:6.1f} img/s, {wall['before'] / wall[name]:.2f}x before "
                  f"(walls {', '.join(f'{v[0]:.1f}' for v in values)} s); {args.images / cpu[name]:5.1f} img per "
                  f"CPU-s, {cpu['before'] / cpu[name]:.2f}x; {bytes_per_image(variants[name][0]):,.0f} B/img")
        now = variants["now fp32"][0]
        phases = build_breakdown(now, frozen, text)
        print(f"  where a 'now fp32' build's CPU time goes ({phases.pop('total'):.2f} s for {args.images} images): "
              + ", ".join(f"{k} {v / sum(phases.values()):.0%}" for k, v in phases.items()))
        print(f"  read (batch 32, text): in memory {read_rate(now, True):,.0f} samples/s, "
              f"streamed {read_rate(now, False):,.0f} samples/s")
        if not args.skip_clip768:
            clip = clip768_encoder(root / "clip768")
            for dtype in ("float32", "bfloat16"):
                s = spec(f"clip768-{dtype}", text_fingerprint=clip.fingerprint, text_dtype=dtype)
                took, _ = timed_build(s, frozen, clip)
                print(f"  768-wide CLIP, text {dtype:>8}: {bytes_per_image(s):,.0f} B/img, build "
                      f"{args.images / took:.1f} img/s, read in memory {read_rate(s, True):,.0f} / streamed "
                      f"{read_rate(s, False):,.0f} samples/s")
        if args.fingerprint_files:
            written, took = fingerprint_cost(root / "many", args.fingerprint_files)
            print(f"  data-file fingerprint over {args.fingerprint_files} images + {args.fingerprint_files} captions "
                  f"(written in {written:.1f} s): {took * 1000:.0f} ms "
                  f"({took / (2 * args.fingerprint_files) * 1e6:.1f} us per file)")


if __name__ == "__main__":
    main()
