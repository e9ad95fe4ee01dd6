"""Sampler accuracy and speed on a saved pipeline.

    python benchmarks/samplers.py --model runs/demo/ldm/pipeline
    python benchmarks/samplers.py --model DIR --samplers euler dpmpp_2m --steps 10 20 --num-images 8

For every sampler and step count, from the same starting noise (image k: seed + k) and the same
prompts, prints the RMSE of the final latents against two 1000-step references, and seconds per image:

  vs_ddpm1000   ancestral DDPM with 1000 steps. DDPM adds fresh noise every step, so this is *a*
                sample from the same start, not the deterministic samplers' limit: their error
                against it never goes to zero (it measures how far the ODE and SDE samples drift).
  vs_ode1000    DDIM (eta = 0) with 1000 steps: a fine discretisation of the probability-flow ODE
                that the deterministic samplers (ddim, euler, heun, dpmpp_*, unipc) converge to;
                their error here is their discretisation error. Stochastic samplers (ddpm, euler_a)
                do not converge to it either.

For a flow-matching model there is no DDPM: both columns use ``euler`` (FlowMatchEuler, the flow
ODE) with 1000 steps, and samplers without a flow form print "skipped".

Latent RMSE is in units of the (unit-variance) latents; pixel RMSE is on the 0-255 scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ldm.cli import parse_config
from ldm.pipeline import DEFAULT_GUIDANCE, LatentDiffusionPipeline
from ldm.samplers import SAMPLERS


@dataclass
class SamplerBenchmarkConfig:
    """Latent/pixel error of each sampler vs 1000-step references, and seconds per image."""

    model: str = ""  # pipeline folder
    prompts: list[str] = field(default_factory=lambda: ["a yellow smiling face", "a red flag", "a green heart"])
    num_images: int = 2  # per prompt
    samplers: list[str] = field(default_factory=lambda: list(SAMPLERS))
    steps: list[int] = field(default_factory=lambda: [10, 20, 50])
    reference_steps: int = 1000
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


def _run(pipe: LatentDiffusionPipeline, cfg: SamplerBenchmarkConfig, sampler: str, steps: int):
    """(latents [N, C, h, w] float32 on CPU, pixels [N, H, W, 3] float64, seconds per image)."""
    chunk = [(p, None) for p in cfg.prompts for _ in range(cfg.num_images)]
    size = pipe.unet.config.sample_size * pipe.factor
    start = time.perf_counter()
    latents = pipe.sample_latents(
        chunk, _generators(len(chunk), cfg.seed), steps, sampler, cfg.guidance, 0.0, size, size
    )
    seconds = (time.perf_counter() - start) / len(chunk)
    pixels = np.stack([np.asarray(im, dtype=np.float64) for im in pipe.decode_latents(latents)])
    return latents.float().cpu(), pixels, seconds


def _rmse(a, b) -> float:
    return float(((a - b) ** 2).mean() ** 0.5)


def main(args: list[str] | None = None) -> None:
    cfg = parse_config(SamplerBenchmarkConfig, args=args)
    if not cfg.model:
        raise SystemExit("--model DIR is required")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    pipe = LatentDiffusionPipeline.from_pretrained(cfg.model, device=device)
    print(f"model {cfg.model} (manifest {pipe.manifest_id[:12]}), prediction {pipe.schedule.prediction_type}, "
          f"zero-SNR {pipe.schedule.zero_terminal_snr}, guidance {cfg.guidance}, "
          f"{len(cfg.prompts) * cfg.num_images} images, device {device}, threads {torch.get_num_threads()}")  # fmt: skip
    sde_ref, ode_ref = ("euler", "euler") if pipe.schedule.is_flow else ("ddpm", "ddim")
    ode_lat, ode_pix, ode_s = _run(pipe, cfg, ode_ref, cfg.reference_steps)
    ddpm_lat, ddpm_s = (ode_lat, ode_s) if sde_ref == ode_ref else _run(pipe, cfg, sde_ref, cfg.reference_steps)[::2]
    print(f"references: {sde_ref} x{cfg.reference_steps} {ddpm_s:.2f} s/img, {ode_ref} x{cfg.reference_steps} "
          f"{ode_s:.2f} s/img; sde vs ode: latent RMSE {_rmse(ddpm_lat, ode_lat):.4f}")  # fmt: skip
    header = f"{'sampler':<17}{'steps':>6}{'lat vs_ddpm1000':>17}{'lat vs_ode1000':>16}{'px vs_ode1000':>15}{'s/img':>8}"
    print(header)
    print("-" * len(header))
    for name in cfg.samplers:
        for steps in cfg.steps:
            try:
                lat, pix, seconds = _run(pipe, cfg, name, steps)
            except ValueError as e:  # e.g. heun on a zero-SNR schedule, ddim on a flow model
                print(f"{name:<17}{steps:>6}  skipped: {e}")
                break
            print(f"{name:<17}{steps:>6}{_rmse(lat, ddpm_lat):>17.4f}{_rmse(lat, ode_lat):>16.4f}"
                  f"{_rmse(pix, ode_pix):>15.2f}{seconds:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
