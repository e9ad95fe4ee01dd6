"""Stage 1: train the KL autoencoder.

    accelerate launch launch/train_vae.py --preset small --data.source DATA --val-data VAL \
        --run.output-dir runs/vae

Rerunning the same command resumes from the newest complete checkpoint. The result is
``OUTPUT/model/``: a diffusers ``AutoencoderKL`` folder whose latents are already normalised to
zero mean and unit variance per channel (``latent_contract.json`` records the statistics).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python launch/train_vae.py` / `accelerate launch launch/train_vae.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig, TrainableAutoencoder, build_autoencoder
from autoencoder.discriminator import build_discriminator
from autoencoder.losses import AUTOENCODER_LOSS_PRESETS, AutoencoderLoss, AutoencoderLossConfig
from data import DataConfig, build_loader
from launch import vae_steps
from launch.checkpoint import CheckpointManager, TrainState
from launch.metrics import MetricsLogger, accumulate_logs, progress_bar, reduce_logs
from launch.runtime import (
    EMA,
    GradScalerState,
    PreemptionFlag,
    RunConfig,
    StepGuard,
    make_generators,
    make_lr_schedule,
    end_of_loop,
    end_of_step,
    run_finished,
    setup_accelerator,
)
from ldm.cli import parse_config, save_config


@dataclass
class TrainVAEConfig:
    """Train a KL autoencoder (stage 1) on captioned or uncaptioned images."""

    data: DataConfig = field(default_factory=lambda: DataConfig(resolution=64, missing_caption="empty"))
    val_data: str = ""
    """--data spec of a held-out set for PSNR/SSIM and reconstruction grids; empty: none."""
    model: AutoencoderConfig = field(default_factory=lambda: AUTOENCODER_PRESETS["small"])
    loss: AutoencoderLossConfig = field(default_factory=lambda: AUTOENCODER_LOSS_PRESETS["small"])
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir=Path("runs/vae")))
    lr: float = 1e-3
    disc_lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    val_every: int = 250
    """Validation (PSNR, SSIM, reconstruction grid) every this many steps, and at the end."""
    val_samples: int = 256
    stats_samples: int = 4096
    """Images used to measure the per-channel latent statistics at the end (0: all)."""


def _preset(name: str, data_res: int, **kw) -> TrainVAEConfig:
    cfg = TrainVAEConfig(model=AUTOENCODER_PRESETS[name], loss=AUTOENCODER_LOSS_PRESETS[name],
                         data=DataConfig(resolution=data_res, missing_caption="empty"))
    return dataclasses.replace(cfg, **kw)


PRESETS: dict[str, TrainVAEConfig] = {
    "tiny": _preset("tiny", 32, run=RunConfig(max_steps=8, batch_size=4, warmup_steps=2, checkpoint_every=4, lr_schedule="constant",
                                               log_every=2, num_workers=0, ema_decay=0.9, report_to="none"),
                    val_every=4, val_samples=8, stats_samples=16),
    # CPU demo: small batches win at a fixed number of images seen (benchmarks/vae_quality.py:
    # batch 8, lr 1e-3, L2 reached 25.7 dB after 8,000 images); the encoder starts nearly deterministic.
    "small": _preset("small", 64, lr=1e-3,
                     run=RunConfig(output_dir=Path("runs/vae"), max_steps=1000, batch_size=8, warmup_steps=50, ema_decay=0.99,
                                   checkpoint_every=250, log_every=25)),
    "kl-f8": _preset("kl-f8", 256, lr=4.5e-6 * 8, run=RunConfig(max_steps=200_000, batch_size=8, mixed_precision="bf16")),
    "kl-f4": _preset("kl-f4", 256, lr=4.5e-6 * 8, run=RunConfig(max_steps=200_000, batch_size=8, mixed_precision="bf16")),
}


def train(cfg: TrainVAEConfig) -> Path:
    run = cfg.run
    acc = setup_accelerator(run)
    out = Path(run.output_dir)
    if run_finished(out / "model", run):
        acc.print(f"{out / 'model'} is complete for this step/time budget; nothing to do.")
        acc.end_training()
        return out / "model"
    if acc.is_main_process:
        save_config(cfg, out / "config.json")

    # Data: our own per-rank split, so the data position is ours to checkpoint.
    loader = build_loader(cfg.data, batch_size=run.batch_size, seed=run.seed, rank=acc.process_index,
                          world_size=acc.num_processes, num_workers=run.num_workers)

    # Models and optimizers; the generator optimizer holds the network and the output log-variance.
    torch.manual_seed(run.seed)  # diffusers initialises weights from the global RNG; nothing else uses it
    model = TrainableAutoencoder(build_autoencoder(cfg.model), logvar_init=cfg.loss.logvar_init)
    disc = build_discriminator(cfg.loss.discriminator)
    loss_fn = AutoencoderLoss(cfg.loss).to(acc.device)
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=cfg.adam_betas)
    sched_g, sched_d = make_lr_schedule(opt_g, run), make_lr_schedule(opt_d, run)
    model, disc, opt_g, opt_d = acc.prepare(model, disc, opt_g, opt_d)
    raw = acc.unwrap_model(model)
    ema = EMA(raw, run.ema_decay).to(acc.device) if run.ema_decay > 0 else None

    gens = make_generators(run.seed, acc.process_index, ["posterior"], device=acc.device)
    state = TrainState(
        modules={"autoencoder": raw, "discriminator": acc.unwrap_model(disc), **({"ema": ema} if ema else {})},
        optimizers={"autoencoder": opt_g, "discriminator": opt_d},
        shared={"lr_autoencoder": sched_g, "lr_discriminator": sched_d, "grad_scaler": GradScalerState(acc)},
        generators=gens, per_rank={"data": loader}, counters={"train_seconds": 0, "skipped": 0},
    )
    ckpt = CheckpointManager(out / "checkpoints", acc, keep_last=run.keep_last)
    resumed = ckpt.resume(state)
    acc.print(f"resumed from {resumed} at step {state.step}" if resumed else f"fresh run -> {out}")

    guard = StepGuard(acc, run, PreemptionFlag())
    guard.total_skipped = state.counters["skipped"]
    guard.start_clock(run, state.counters["train_seconds"])
    logger = MetricsLogger(acc, out, run.report_to, out.name, {"model": cfg.model.to_dict()})
    val = vae_steps.Validator(cfg, acc, out) if cfg.val_data else None
    bar = progress_bar(acc, state.step, run.max_steps, "stage 1: autoencoder")
    batches, sums = iter(loader), {}
    t_start, step0, stop = time.time(), state.step, False
    t0 = t_start - state.counters["train_seconds"]  # training time carries over a resume

    while state.step < run.max_steps and not stop:
        xs = vae_steps.micro_batches(batches, run.grad_accum_steps, acc.device)
        logs, applied, stop = vae_steps.train_step(acc, model, disc, loss_fn, opt_g, opt_d, xs, state.step,
                                                   gens["posterior"], run, guard)
        if applied:  # a skipped (non-finite) step advances neither the schedules nor the EMA
            sched_g.step()
            if loss_fn.discriminator_active(state.step):
                sched_d.step()  # its warmup starts when the GAN switches on
            if ema is not None:
                ema.update(raw)
        state.counters["skipped"] = guard.total_skipped
        state.step += 1
        state.counters["train_seconds"] = round(time.time() - t0, 3)
        bar.update(1)
        accumulate_logs(sums, logs)
        last = state.step >= run.max_steps or guard.time_up
        if state.step % run.log_every == 0 or last:
            speed = (state.step - step0) * run.batch_size * run.grad_accum_steps * acc.num_processes / (time.time() - t_start)
            row = reduce_logs(acc, sums, lr=sched_g.get_last_lr()[0], images_per_s=speed,
                                        skipped_steps=state.counters["skipped"])
            logger.log(state.step, row)
            bar.set_postfix(rec=f"{row.get('reconstruction', math.nan):.4f}")
        if val is not None and (state.step % cfg.val_every == 0 or last):
            scores = val.run(model, ema, state.step)
            logger.log(state.step, scores, kind="val")
            if scores:
                bar.write(f"step {state.step}: validation {vae_steps.describe(scores)}")
        end_of_step(ckpt, state, run, acc, stop, last)
        if last:
            break
    bar.close()
    end_of_loop(acc, acc.unwrap_model(model), "autoencoder", guard, logger, state.step, stop)

    model_dir = vae_steps.export(cfg, acc, model, ema, out, state.step, state.counters["train_seconds"])
    if acc.is_main_process:
        vae_steps.plot(out)
    logger.close()
    acc.end_training()  # tear gloo/NCCL down now: left to interpreter exit it can abort a rank
    return model_dir


def main(args: list[str] | None = None) -> None:
    train(parse_config(TrainVAEConfig, PRESETS, args=args, default_preset="small"))


if __name__ == "__main__":
    main()
