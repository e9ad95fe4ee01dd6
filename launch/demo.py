"""`make demo`: the whole pipeline on the Noto emoji set, from nothing to runs/demo/samples.png.

Each stage is the same command a user would type (printed before it runs), so the demo doubles as
a worked example. A stage whose output is complete is skipped, and an interrupted stage resumes
from its last checkpoint, so rerunning `make demo` after Ctrl-C carries on where it stopped.

On a CPU the budgets below keep training + generation within about 15 minutes on 2 cores; with a
GPU the same command trains several times longer for better images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from launch.evaluation.pictures import labelled_grid
from ldm.cli import parse_config
from text_encoder.precision import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent

STAGE3_EXTRA_MINUTES = 1.4  # stage 3 besides training and the cache (start, last validation, export: 0.5 measured), generation (0.4), 0.5 margin
# The training loop's mean step (data, logging, validation every 500 steps and the sample grids
# included) over the calibrated one, in three fresh-clone demos on a quiet AVX2 EPYC: 0.301 s against
# a calibrated 0.334 (0.90), 0.317 against 0.295 (1.07), 0.308 against 0.270 (1.14, 12 calibration
# steps); the calibration is that noisy. Erring long costs little: the time cap then stops the run in
# the cosine's tail (the third demo: at 1,457 of 1,633 steps, LR 3% of its peak). Two demos on a quiet
# AMX Xeon: 0.139 s against 0.123 (1.13; stopped at 3,880 of 4,372) and 0.119 against 0.109 (1.09;
# 5,451 of 5,956). The mean of the five, 1.07, lets the cosine end more often inside the minutes.
LOOP_OVERHEAD = 1.07
# On a shared VM (AVX512-BF16 EPYC, 2026-12-04) the bare step drifted between 146 and 264 ms within
# 120 steps, and 12 calibration steps said 0.144 s where the loop ran 0.194 (1.35x: stopped at 2,572
# of 3,228 steps, LR at 10% of its peak). Medians of 12 steps there: 0.153 and 0.163 s; of 60: 0.201.
# 40 steps (~7 s) average over more of such drift for 5 s more of planning.
CALIBRATION_STEPS = 40

DEMO_PROMPTS = [
    "grinning face",
    "smiling face with heart-eyes",
    "face with tears of joy",
    "a happy yellow face",  # phrased unlike any training caption
    "dog face",
    "cat face",
    "a red apple",  # training caption: "red apple"
    "pizza",
    "flag: france",
    "flag: japan",
    "the flag of brazil",  # phrased differently
    "red heart",
    "rocket",
    "sun",
    "waving hand: medium skin tone",
    "thumbs up",
]


@dataclasses.dataclass
class DemoConfig:
    """Run the whole pipeline on the emoji set: prepare data, train the VAE, train the UNet, generate."""

    out: Path = Path("runs/demo")
    """Folder of everything the demo writes (data, vae/, ldm/, samples)."""
    vae_minutes: float = 0.0
    """Training budget for stage 1; 0 picks 4.5 on a CPU, 30 on a GPU."""
    ldm_minutes: float = 0.0
    """Training budget for stage 3; 0 picks 60 on a GPU, and on a CPU what is left of --cpu-total-minutes
    after stage 1, the plan, the latent cache and the rest of stage 3 (see stage3_minutes). On a CPU the
    step count is fitted to these minutes from a measured step, so the LR schedule ends about when they do."""
    cpu_total_minutes: float = 15.0
    """On a CPU, the wall-clock budget of all stages together (data, both trainings, generation)."""
    text_encoder: str = "minilm?max_length=24"
    """Emoji captions are short: 24 tokens instead of 77 makes cross-attention ~3x cheaper."""
    sampler: str = "dpmpp_2m"
    """Sampler of the final samples (see ldm-generate --help)."""
    steps: int = 25
    """Sampler steps of the final samples."""
    guidance: float = 4.0
    """Guidance scale of the final samples."""
    seed: int = 0
    """Seed of the first final sample (image k uses seed + k)."""

    def __post_init__(self) -> None:
        for name in ("vae_minutes", "ldm_minutes"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: the default budget), not {getattr(self, name)}")
        if not self.cpu_total_minutes > 0:
            raise ValueError(f"--cpu-total-minutes must be > 0, not {self.cpu_total_minutes}")


def _run(cmd: list[str], title: str) -> float:
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    elapsed = time.time() - start
    print(f"=== {title}: {elapsed / 60:.1f} min", flush=True)
    return elapsed


def labelled_samples(folder: Path, prompts: list[str], scale: int = 2) -> Image.Image:
    """ldm-generate's images (one per prompt, named by index), enlarged, each above its prompt."""
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("[0-9]*-seed*.png"))]
    if len(images) != len(prompts):
        raise RuntimeError(f"expected {len(prompts)} generated images in {folder}, found {len(images)}")
    big = [im.resize((im.width * scale, im.height * scale), Image.Resampling.LANCZOS) for im in images]
    return labelled_grid(big, prompts, ncol=math.ceil(math.sqrt(len(big))))


def stage3_steps(plan: dict[str, float], minutes: float) -> int:
    """The steps that fill ``minutes`` of stage 3 at the measured pace (an existing run's count, if any)."""
    if plan["resumed_steps"]:
        return int(plan["resumed_steps"])
    return max(100, math.floor(minutes * 60 / (plan["step_seconds"] * LOOP_OVERHEAD)))


def stage3_minutes(cfg: DemoConfig, gpu: bool, spent_minutes: float, cache_minutes: float) -> float:
    """Stage 3's training minutes: --ldm-minutes if given, 60 on a GPU, and on a CPU all that is left of
    --cpu-total-minutes after ``spent_minutes`` (data, stage 1, the plan), the cache build and
    STAGE3_EXTRA_MINUTES, so the demo's stages together stay within the total (at least 1 minute).

    There is no fixed cap: since the second sweep more UNet steps always scored better, and a fast CPU
    (AMX: stage 1 in 2.8 minutes) used to leave 2-3 of its 15 minutes unused under the old 9-minute cap."""
    if cfg.ldm_minutes:
        return cfg.ldm_minutes
    if gpu:
        return 60.0
    return max(1.0, cfg.cpu_total_minutes - spent_minutes - cache_minutes - STAGE3_EXTRA_MINUTES)


def plan_stage3(cfg: DemoConfig, out: Path) -> dict[str, float]:
    """Seconds per stage-3 step and minutes of the latent cache build on this CPU, measured (~15 s: the
    median of 40 steps after 3, and two batches of the cache's encoders).

    A run that already has a checkpoint keeps the step count it started with (its LR schedule), so a
    rerun resumes or finds it finished instead of training on with another schedule."""
    from autoencoder.folder import load_autoencoder, read_latent_contract
    from launch.train_ldm import PRESETS
    from launch.training.step_timing import cache_seconds_per_image, unet_step_seconds
    from text_encoder import load_text_encoder

    preset = PRESETS["small"]
    resumed = 0
    previous = out / "ldm" / "config.json"
    if previous.is_file():
        resumed = int(json.loads(previous.read_text(encoding="utf-8"))["run"]["max_steps"])
    contract = read_latent_contract(out / "vae" / "model")
    te = load_text_encoder(cfg.text_encoder, default_dtype="auto")
    resolution = preset.data.resolution
    step = unet_step_seconds(preset.unet, text_width=te.hidden_size, text_tokens=te.max_length,
                             latent_channels=contract.latent_channels,
                             latent_size=resolution // contract.downsample_factor, batch_size=preset.run.batch_size,
                             channels_last=preset.channels_last, optimizer=preset.optimizer, steps=CALIBRATION_STEPS,
                             warmup=3)
    cached = out / "ldm" / "cache" / "cache_manifest.json"
    per_image = 0.0 if cached.is_file() else cache_seconds_per_image(
        load_autoencoder(out / "vae" / "model")[0], te, resolution=resolution, flip=preset.data.flip)
    n_train = json.loads((out / "data" / "stats.json").read_text(encoding="utf-8"))["train"]["samples_written"]
    return {"step_seconds": step, "cache_minutes": n_train * per_image / 60, "resumed_steps": resumed}


def main(args: list[str] | None = None) -> None:
    cfg = parse_config(DemoConfig, args=args)
    gpu = torch.cuda.is_available()
    # Stage 1 in bf16 on a CPU with AMX/AVX512-BF16 takes 0.16 instead of 0.28 s per step (the UNet
    # gains only ~7%): its 1,000 steps then fit in ~3.3 minutes and stage 3 gets the minute saved.
    cpu_bf16 = not gpu and cpu_has_native_bf16()
    vae_min = cfg.vae_minutes or (30.0 if gpu else 4.5)
    py = sys.executable
    out = cfg.out
    data = out / "data"
    timings = {}

    timings["data"] = _run([py, "launch/prepare_data.py", "--emoji", str(data)], "prepare the emoji set")
    timings["vae"] = _run(
        [py, "launch/train_vae.py", "--preset", "small", "--data", str(data / "train"),
         "--val-data", str(data / "val"), "--run.output-dir", str(out / "vae"),
         "--run.max-train-minutes", str(vae_min)]
        # On a GPU batch 8 leaves it idle (H200: 112 img/s at batch 8, 811 at batch 64, bf16).
        + (["--run.max-steps", "20000", "--run.batch-size", "64", "--run.mixed-precision", "bf16"] if gpu else [])
        + (["--run.mixed-precision", "bf16"] if cpu_bf16 else []),
        "stage 1: train the autoencoder",
    )
    # A slower CPU spends all of stage 1's budget (this one: ~450 steps in 4.5 min, where an AMX
    # machine does 1,000 in 3.3), so stage 3 gets what remains, less the measured plan and cache
    # estimate and STAGE3_EXTRA_MINUTES (its final validation and export, the generation, a margin).
    ldm_min, fitted = stage3_minutes(cfg, gpu, 0.0, 0.0), []
    if not gpu:
        start = time.time()
        plan = plan_stage3(cfg, out)
        timings["plan"] = time.time() - start
        ldm_min = stage3_minutes(cfg, gpu, sum(timings.values()) / 60, plan["cache_minutes"])
        steps = stage3_steps(plan, ldm_min)
        fitted = ["--run.max-steps", str(steps)]
        print(f"stage 3 plan: {plan['step_seconds']:.3f} s per step measured, latent cache ~{plan['cache_minutes']:.1f} min "
              f"-> {steps} steps in {ldm_min:.1f} min" + (" (the existing run's count)" if plan["resumed_steps"] else ""),
              flush=True)
    timings["ldm"] = _run(
        [py, "launch/train_ldm.py", "--preset", "small", "--data", str(data / "train"),
         "--val-data", str(data / "val"), "--vae", str(out / "vae" / "model"),
         "--text-encoder", cfg.text_encoder, "--cache-latents", "--cache-text", "--run.output-dir", str(out / "ldm"),
         # Each base emoji (with its up to 25 skin-tone variants) is drawn as often as any single-image
         # emoji: subcategory ratio 0.567 vs 0.517 and FD 4.13 vs 5.00 at 5,451 steps (recipe_sweep.md).
         "--data.balance-by", "base",
         "--run.max-train-minutes", str(ldm_min)] + fitted + (["--run.max-steps", "40000", "--run.batch-size", "128", "--run.mixed-precision", "bf16"] if gpu else []),
        "stage 3: train the text-conditioned UNet",
    )
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(DEMO_PROMPTS) + "\n", encoding="utf-8")
    timings["generate"] = _run(
        ["ldm-generate" if shutil.which("ldm-generate") else str(Path(py).parent / "ldm-generate"),
         "--model", str(out / "ldm" / "pipeline"), "--prompts-file", str(prompts),
         "--sampler", cfg.sampler, "--steps", str(cfg.steps), "--guidance", str(cfg.guidance),
         "--seed", str(cfg.seed), "--out", str(out / "samples")],
        "generate the sample grid",
    )
    labelled_samples(out / "samples", DEMO_PROMPTS).save(out / "samples.png")
    print("\nDone. Wall time per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    print(f"Look at: {out / 'samples.png'} (generated), {out / 'vae' / 'reconstructions.png'} (autoencoder),")
    print(f"         {out / 'vae' / 'loss_curves.png'} and {out / 'ldm' / 'loss_curves.png'} (training curves)")


if __name__ == "__main__":
    main()
