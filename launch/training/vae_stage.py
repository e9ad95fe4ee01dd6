"""The pieces of stage-1 training that would crowd train_vae.py: one optimizer step, validation,
and the final export with latent statistics."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from autoencoder.folder import save_autoencoder
from autoencoder.latents import LatentStatistics, fold_latent_statistics
from autoencoder.metrics import reconstruction_metrics
from data import DataConfig, iterate_once
from autoencoder import LatentContract, TrainableAutoencoder, build_autoencoder
from autoencoder.losses import AutoencoderLoss
from autoencoder.pretrained import autoencoder_config_of, freeze_encoder, load_for_training
from launch.evaluation.pictures import plot_curves, reconstruction_grid
from launch.training.config import RunConfig
from launch.training.ema import EMA, averaged_copy
from launch.training.guard import StepGuard
from launch.training.tracking import add_logs, read_metrics

if TYPE_CHECKING:  # the command owns its config; imported for annotations only
    from launch.train_vae import TrainVAEConfig


def trained_autoencoder(cfg: TrainVAEConfig, acc: Accelerator) -> tuple[TrainableAutoencoder, LatentContract | None]:
    """The network stage 1 trains: a fresh one from ``cfg.model``, or ``--init-from``'s weights (then
    ``cfg.model`` becomes its architecture), with the encoder frozen under ``--decoder-only``.
    Also returns the latent contract of an ``--init-from`` stage-1 folder (else None)."""
    torch.manual_seed(cfg.run.seed)  # diffusers initialises weights from the global RNG; nothing else uses it
    kept = None
    if cfg.init_from:
        vae, _, kept = load_for_training(cfg.init_from, cfg.init_from_config)
        cfg.model = autoencoder_config_of(vae)
        if cfg.data.resolution % cfg.model.downsample_factor:
            raise SystemExit(f"--data.resolution {cfg.data.resolution} is not a multiple of --init-from's "
                             f"downsampling factor {cfg.model.downsample_factor}")
    elif cfg.decoder_only:
        raise SystemExit("--decoder-only fine-tunes an existing autoencoder: give --init-from SRC")
    else:
        vae = build_autoencoder(cfg.model)
    model = TrainableAutoencoder(vae, logvar_init=cfg.loss.logvar_init)
    if cfg.decoder_only:
        acc.print(f"--decoder-only: {freeze_encoder(vae):,} decoder parameters train; the encoder is frozen")
    return model, kept


@dataclass
class AutoencoderStep:
    """What one stage-1 optimizer step works on (the models are the accelerate-prepared ones)."""

    acc: Accelerator
    model: torch.nn.Module  # TrainableAutoencoder, DDP-wrapped when distributed
    disc: torch.nn.Module
    loss_fn: AutoencoderLoss
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    generator: torch.Generator  # posterior samples
    run: RunConfig
    guard: StepGuard


def train_step(s: AutoencoderStep, micro_batches: list[torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimizer step of the autoencoder (and the discriminator once the GAN is on).

    Gradients are accumulated over ``micro_batches`` with DDP's sync only on the last one.
    Returns (detached logs, step applied), identical on every rank; a preemption request is
    recorded in ``s.guard``.
    """
    acc, model, disc, loss_fn, opt_g, opt_d, run = s.acc, s.model, s.disc, s.loss_fn, s.opt_g, s.opt_d, s.run
    raw = acc.unwrap_model(model)
    gan_on = loss_fn.discriminator_active(step)
    n = len(micro_batches)
    logs: dict[str, torch.Tensor] = {}
    recons = []
    for i, x in enumerate(micro_batches):
        with acc.no_sync(model) if i < n - 1 else nullcontext():
            out = model(x, generator=s.generator)
            loss, step_logs = loss_fn.generator_loss(x, out.reconstruction, out.posterior, out.output_logvar, step,
                                                     raw.last_layer() if gan_on else None, disc if gan_on else None)
            acc.backward(loss / n)
        recons.append(out.reconstruction.detach())
        add_logs(logs, step_logs, 1 / n)
    norm = acc.clip_grad_norm_(model.parameters(), run.max_grad_norm or math.inf)
    if gan_on:
        for i, (x, r) in enumerate(zip(micro_batches, recons)):
            with acc.no_sync(disc) if i < n - 1 else nullcontext():
                loss_d, d_logs = loss_fn.discriminator_loss(x, r, step, disc)
                acc.backward(loss_d / n)
            add_logs(logs, d_logs, 1 / n)
        norm = norm + acc.clip_grad_norm_(disc.parameters(), run.max_grad_norm or math.inf)  # NaN/inf propagate
    applied, _ = s.guard.check(norm, step)
    if applied:
        opt_g.step()
        if gan_on:
            opt_d.step()
    opt_g.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    logs["grad_norm"] = norm.detach().float()
    return logs, applied


class Validator:
    """PSNR / SSIM of the EMA weights on a fixed held-out set, plus a reconstruction grid (rank 0)."""

    def __init__(self, cfg: TrainVAEConfig, acc: Accelerator, out: Path):
        self.acc = acc
        self.out = out
        self.batch_size = cfg.run.eval_batch_size
        self.images: torch.Tensor | None = None
        if acc.is_main_process:
            data = cfg.data.with_source(cfg.val_data)
            batches, n = [], 0
            for batch in iterate_once(data, batch_size=self.batch_size):
                batches.append(batch["pixel_values"])
                n += len(batch["pixel_values"])
                if n >= cfg.val_samples:
                    break
            if not batches:
                raise SystemExit(f"--val-data {cfg.val_data}: no usable images found")
            self.images = torch.cat(batches)[: cfg.val_samples]
        self.eval_model: torch.nn.Module | None = None  # the EMA copy, refilled at each validation

    @torch.no_grad()
    def run(self, model: torch.nn.Module, ema: EMA | None, step: int) -> dict[str, float]:
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return {}
        self.eval_model = averaged_copy(self.acc.unwrap_model(model), ema, into=self.eval_model)
        scores: dict[str, list[torch.Tensor]] = {}
        recons = []
        for chunk in self.images.split(self.batch_size):
            x = chunk.to(self.acc.device)
            recon = self.eval_model(x, sample_posterior=False).reconstruction.clamp(-1, 1)
            recons.append(recon[:8].cpu())
            for k, v in reconstruction_metrics(recon, x).items():
                scores.setdefault(k, []).append(v.float().cpu())
        grid = reconstruction_grid(self.images[:8], torch.cat(recons)[:8])
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        grid.save(self.out / "samples" / f"reconstructions_{step:07d}.png")
        grid.save(self.out / "reconstructions.png")
        return {k: torch.cat(v).mean().item() for k, v in scores.items()}


@torch.no_grad()
def measure_latent_statistics(data_cfg: DataConfig, acc: Accelerator, vae: AutoencoderKL, max_samples: int,
                              batch_size: int) -> LatentStatistics:
    """Per-channel latent mean/std over ``data_cfg``'s images (centre crops, no flips), summed
    across all processes; ``max_samples`` 0 means all."""
    stats = LatentStatistics(vae.config.latent_channels, device=acc.device)
    generator = torch.Generator(acc.device).manual_seed(acc.process_index)  # posterior samples (see latents.py)
    per_rank = math.ceil(max_samples / acc.num_processes) if max_samples else None
    seen = 0
    data = data_cfg.replace(crop="center", flip=False)
    for batch in iterate_once(data, batch_size=batch_size, rank=acc.process_index, world_size=acc.num_processes):
        x = batch["pixel_values"].to(acc.device)
        stats.update_from_posterior(vae.encode(x).latent_dist, generator=generator)
        seen += len(x)
        if per_rank and seen >= per_rank:
            break
    totals = acc.reduce(stats.as_tensor(), reduction="sum")
    return LatentStatistics.from_tensor(totals.cpu())


def export(cfg: TrainVAEConfig, acc: Accelerator, model: torch.nn.Module, ema: EMA | None, out: Path) -> Path:
    """EMA weights -> latent statistics (all ranks) -> folded, saved ``out/model`` (rank 0)."""
    final = averaged_copy(acc.unwrap_model(model), ema)
    stats = measure_latent_statistics(cfg.data, acc, final.vae, cfg.stats_samples, cfg.run.eval_batch_size)
    model_dir = out / "model"
    if acc.is_main_process:
        contract = fold_latent_statistics(final.vae, stats, cfg.model)
        save_autoencoder(final.vae, contract, model_dir, overwrite=True)
        acc.print(f"latent mean {[round(v, 3) for v in stats.mean().tolist()]}, "
                  f"std {[round(v, 3) for v in stats.std().tolist()]} (folded into the saved model)")
        acc.print(f"saved {model_dir}")
    acc.wait_for_everyone()
    return model_dir


def plot(out: Path) -> None:
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, ["loss", "reconstruction", "kl", "grad_norm"], out / "loss_curves.png", "autoencoder: training", kind="train")
    plot_curves(records, ["psnr", "ssim"], out / "val_curves.png", "autoencoder: validation (EMA)", kind="val")


def micro_batches(loader_iter: Iterator[dict[str, Any]], n: int, device: torch.device) -> list[torch.Tensor]:
    return [next(loader_iter)["pixel_values"].to(device, non_blocking=True) for _ in range(n)]


def describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
