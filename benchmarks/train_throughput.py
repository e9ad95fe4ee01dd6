"""Stage-3 training throughput with and without `--cache-latents --cache-text` (CPU by default).

Same UNet (`small` preset), `minilm` text encoder (32 tokens), `small` autoencoder preset at 64 px,
AdamW, batch 32, on generated captioned PNGs:

  (a) on the fly: decode + resize (data.build_loader), VAE encode + sample, text encode, caption
      dropout, UNet forward/backward, AdamW step
  (b) cached:     gather from the cache (CachedLatentLoader), sample latents from the cached
      mean/std, caption dropout, UNet forward/backward, AdamW step

    .venv/bin/python -m benchmarks.train_throughput [--steps 6] [--warmup 2] [--batch-size 32] [--images 256]

The two modes alternate step by step after a warm-up (the first steps build oneDNN kernels and the
optimizer state and are several times slower), and the median step counts, so a burst of load from
other jobs on a shared CPU hits both. The CPU-time share of each phase is printed as well: it is
steadier than wall-clock time on a busy machine and shows where an on-the-fly step spends its time.
The one-off cost of building the cache is printed too, with the number of trained images after which
it has paid for itself. The autoencoder is randomly initialised: its speed, not its quality, matters
here. Prints numbers only; no assertions.

Measured on the idle 2-core CPU (torch 2.14.1): on the fly 41.0 img/s, cached 58.9 img/s: 1.44x
wall-clock, 1.42x CPU time; the cache (both flips + text) builds at 62 img/s and pays for itself after
~560 trained images. Earlier, on the shared 2-core CPU (load ~9, steps varying 2-3x), two runs:
  on the fly 1.4 / 1.9 img/s, cached 2.2 / 2.8 img/s: 1.56x / 1.50x wall-clock (1.52x / 1.48x CPU time).
  Encoding is ~21% of an on-the-fly step's CPU time; the UNet step itself also ran ~15% slower when
  it shared a step with the encoders (memory traffic and allocator churn), which makes up the rest.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from ldm.cached_loader import CachedLatentLoader, sample_latents
from ldm.conditioning import drop_captions
from ldm.latent_cache import build_cache, cache_key, open_cache
from ldm.objective import DIFFUSION_PRESETS, DiffusionObjective
from ldm.unet import build_unet, unet_denoiser
from text_encoder import load_text_encoder

RESOLUTION = 64


def make_images(folder: Path, n: int) -> None:
    """n random-colour gradient PNGs (80x64, so the loader really resizes and crops) with captions."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    for i in range(n):
        r, g, b = rng.integers(0, 256, size=3)
        pixels = np.stack([(xx * 3 + r) % 256, (yy * 3 + g) % 256, (xx + yy + b) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.png")
        (folder / f"img{i:04d}.txt").write_text(f"a gradient number {i} in colour {r} {g} {b}", encoding="utf-8")


class Models:
    """The frozen stages, the trained UNet with its AdamW, and the step's generator."""

    def __init__(self) -> None:
        torch.manual_seed(0)  # weights only; every draw in the steps uses self.generator
        self.vae = build_autoencoder(AUTOENCODER_PRESETS["small"]).eval().requires_grad_(False)
        self.text = load_text_encoder("minilm", max_length=32)
        self.null = self.text.null_embedding().hidden  # [1, 32, 384]
        self.unet = build_unet("small", cross_attention_dim=self.text.hidden_size).train()
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        self.objective = DiffusionObjective(DIFFUSION_PRESETS["sd"])
        self.denoiser = unet_denoiser(self.unet)
        self.generator = torch.Generator().manual_seed(0)

    def train_step(self, latents: torch.Tensor, hidden: torch.Tensor) -> None:
        """Caption dropout, UNet forward/backward on latents [B, 4, 16, 16], hidden [B, 32, 384], AdamW."""
        cond, _ = drop_captions(hidden, self.null, 0.1, self.generator)
        loss, _ = self.objective.loss(self.denoiser, latents, cond, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Phases:
    """Wall and CPU seconds spent per phase of a step (CPU time is steadier on a shared machine)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


def on_the_fly_step(models: Models, loader: data.CaptionedLoader, phase: Phases) -> None:
    with phase("decode + resize"):
        batch = next(loader)
    with torch.no_grad():
        with phase("VAE encode + sample"):
            latents = models.vae.encode(batch["pixel_values"]).latent_dist.sample(models.generator)  # [B, 4, 16, 16]
        with phase("text encode"):
            hidden = models.text.encode(batch["captions"]).hidden  # [B, 32, 384]
    with phase("UNet fwd/bwd + AdamW"):
        models.train_step(latents, hidden)


def cached_step(models: Models, loader: CachedLatentLoader, phase: Phases) -> None:
    with phase("cache gather + sample"):
        batch = next(loader)
        latents = sample_latents(batch["latent_mean"], batch["latent_std"], models.generator)  # [B, 4, 16, 16]
    with phase("UNet fwd/bwd + AdamW"):
        models.train_step(latents, batch["text_hidden"])


def timed_step(step: Callable[[], None], batch_size: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return batch_size / (time.perf_counter() - wall), batch_size / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="generated training images")
    args = parser.parse_args()
    models = Models()
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache_dir = Path(tmp) / "images", Path(tmp) / "cache"
        folder.mkdir()
        make_images(folder, args.images)
        cfg = data.DataConfig(source=str(folder), resolution=RESOLUTION, crop="center", flip=True)
        vae_fp, text_fp = {"weights_sha256": "benchmark-random-small"}, models.text.fingerprint
        start = time.perf_counter()
        build_cache(cfg, cache_dir, vae=models.vae, vae_fingerprint=vae_fp, text_encoder=models.text,
                    text_fingerprint=text_fp, rank=0, world_size=1, barrier=lambda: None, batch_size=64)
        build_seconds = time.perf_counter() - start
        cache = open_cache(cache_dir, cache_key(cfg, vae_fp, text_fp))
        live = data.build_loader(cfg, batch_size=args.batch_size, seed=0)
        cached = CachedLatentLoader(cache, batch_size=args.batch_size, seed=0)
        warm = {"on the fly": Phases(), "cached": Phases()}  # discarded: first steps are slow
        phases = {"on the fly": Phases(), "cached": Phases()}
        for _ in range(args.warmup):
            on_the_fly_step(models, live, warm["on the fly"])
            cached_step(models, cached, warm["cached"])
        rates: dict[str, list[tuple[float, float]]] = {"on the fly": [], "cached": []}
        for _ in range(args.steps):  # alternate step by step, so load bursts hit both modes
            rates["on the fly"].append(timed_step(lambda: on_the_fly_step(models, live, phases["on the fly"]),
                                                  args.batch_size))
            rates["cached"].append(timed_step(lambda: cached_step(models, cached, phases["cached"]), args.batch_size))
    report(rates, phases, build_seconds, args)


def report(rates: dict[str, list[tuple[float, float]]], phases: dict[str, Phases], build_seconds: float,
           args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} steps per mode after {args.warmup} warm-up, {args.images} images at {RESOLUTION} px")
    wall = {name: statistics.median(r[0] for r in values) for name, values in rates.items()}
    cpu = {name: statistics.median(r[1] for r in values) for name, values in rates.items()}
    for name, values in rates.items():
        steps = ", ".join(f"{r[0]:.1f}" for r in values)
        print(f"  {name:>10}: {wall[name]:6.1f} img/s (steps: {steps});  {cpu[name]:6.1f} img per CPU-second")
    print(f"  speed-up cached / on the fly: {wall['cached'] / wall['on the fly']:.2f}x wall-clock, "
          f"{cpu['cached'] / cpu['on the fly']:.2f}x CPU time")
    for name, phase in phases.items():
        total = sum(phase.cpu.values())
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in phase.cpu.items())
        print(f"  CPU time of a {name} step: {shares}")
    saved_per_image = 1 / wall["on the fly"] - 1 / wall["cached"]
    payback = "no gain"
    if saved_per_image > 0:
        payback = f"pays for itself after {build_seconds / saved_per_image:.0f} trained images"
    print(f"  cache build (both flips + text): {build_seconds:.1f} s for {args.images} images "
          f"({args.images / build_seconds:.1f} img/s); {payback}")


if __name__ == "__main__":
    main()
