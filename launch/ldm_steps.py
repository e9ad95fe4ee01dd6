"""The pieces of stage-3 training that would crowd train_ldm.py: where a batch of latents and text
comes from (on the fly or cached), one optimizer step, held-out loss, sample grids, export."""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from data import build_loader, iterate_once
from launch.pictures import labelled_grid, plot_curves
from launch.metrics import read_metrics
from launch.runtime import EMA, RunConfig, StepGuard
from ldm.cached_loader import CachedLatentLoader, sample_latents
from ldm.conditioning import drop_captions
from ldm.latent_cache import ensure_cache
from ldm.objective import DiffusionObjective
from ldm.pipeline import LatentDiffusionPipeline
from ldm.unet import unet_denoiser

VAL_TIMESTEPS = (50, 250, 500, 750, 950)


class Batches:
    """Endless (latents [B, C, h, w], text hidden [B, L, D]) pairs, cached or encoded on the fly.

    Both paths draw the latent sample from the same explicit generator (``mean + std * eps``), so
    switching caching on changes where the numbers come from, not which random stream they use.
    """

    def __init__(self, cfg, acc, vae, text_encoder, vae_fingerprint: dict[str, Any]):
        self.acc, self.vae, self.text_encoder = acc, vae, text_encoder
        run = cfg.run
        self.cached_text = cfg.cache_text
        if cfg.cache_latents or cfg.cache_text:
            cache = ensure_cache(
                cfg.data, cfg.cache_dir or Path(run.output_dir) / "cache", vae=vae, vae_fingerprint=vae_fingerprint,
                text_encoder=text_encoder if cfg.cache_text else None,
                text_fingerprint=text_encoder.fingerprint if cfg.cache_text else None,
                rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone,
            )
            self.loader = CachedLatentLoader(cache, batch_size=run.batch_size, seed=run.seed,
                                             rank=acc.process_index, world_size=acc.num_processes)
            self.cached = True
        else:
            self.loader = build_loader(cfg.data, batch_size=run.batch_size, seed=run.seed, rank=acc.process_index,
                                       world_size=acc.num_processes, num_workers=run.num_workers)
            self.cached = False
        self._it = iter(self.loader)

    @torch.no_grad()
    def next(self, latent_generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self._it)
        device = self.acc.device
        if self.cached:
            latents = sample_latents(batch["latent_mean"], batch["latent_std"], latent_generator)
        else:
            posterior = self.vae.encode(batch["pixel_values"].to(device)).latent_dist
            latents = posterior.sample(generator=latent_generator)
        if self.cached and self.cached_text:
            hidden = batch["text_hidden"]
        else:
            hidden = self.text_encoder.encode(list(batch["captions"])).hidden
        return latents.to(device, torch.float32), hidden.to(device, torch.float32)


def train_step(acc, unet, objective: DiffusionObjective, opt, batches: Batches, null_hidden: torch.Tensor,
               p_uncond: float, gens: dict[str, torch.Generator], run: RunConfig,
               guard: StepGuard, step: int) -> tuple[dict[str, torch.Tensor], bool, bool]:
    """One optimizer step over ``run.grad_accum_steps`` micro-batches; decisions agree on every rank."""
    n = run.grad_accum_steps
    logs: dict[str, torch.Tensor] = {}
    denoise = unet_denoiser(unet)
    for i in range(n):
        latents, hidden = batches.next(gens["latent"])
        # Caption dropout for classifier-free guidance: the one place it happens (Ho & Salimans 2022).
        cond, dropped = drop_captions(hidden, null_hidden, p_uncond, gens["dropout"])
        with acc.no_sync(unet) if i < n - 1 else nullcontext():
            with acc.autocast():
                loss, step_logs = objective.loss(denoise, latents, cond, gens["diffusion"])
            acc.backward(loss / n)
        step_logs = {**step_logs, "loss": loss.detach(), "dropped_fraction": dropped.float().mean()}
        for k, v in step_logs.items():
            logs[k] = logs.get(k, 0) + v.float() / n
    norm = acc.clip_grad_norm_(unet.parameters(), run.max_grad_norm or math.inf)
    applied, stop = guard.check(norm, step)
    if applied:
        opt.step()
    opt.zero_grad(set_to_none=True)
    logs["grad_norm"] = norm.detach().float()
    return logs, applied, stop


class Evaluator:
    """Held-out loss at fixed timesteps and sample grids, with the EMA weights, on rank 0."""

    def __init__(self, cfg, acc, vae, text_encoder, objective: DiffusionObjective, out: Path, unet_config):
        self.cfg, self.acc, self.vae, self.te, self.objective, self.out = cfg, acc, vae, text_encoder, objective, out
        self.unet_config = unet_config
        self.latents = self.hidden = None
        if acc.is_main_process and cfg.val_data:
            self._load_validation(cfg)
        self.eval_unet = None

    @torch.no_grad()
    def _load_validation(self, cfg) -> None:
        latents, hidden, n = [], [], 0
        for batch in iterate_once(cfg.data.replace(source=cfg.val_data), batch_size=64):
            latents.append(self.vae.encode(batch["pixel_values"].to(self.acc.device)).latent_dist.mean)
            hidden.append(self.te.encode(list(batch["captions"])).hidden)
            n += len(batch["captions"])
            if n >= cfg.val_samples:
                break
        self.latents = torch.cat(latents)[: cfg.val_samples]
        self.hidden = torch.cat(hidden)[: cfg.val_samples]

    def _ema_unet(self, unet, ema: EMA | None):
        raw = self.acc.unwrap_model(unet, keep_torch_compile=False)
        if self.eval_unet is None:
            self.eval_unet = copy.deepcopy(raw).eval()
        self.eval_unet.load_state_dict(raw.state_dict())
        if ema is not None:
            ema.copy_to(self.eval_unet)
        return self.eval_unet

    @torch.no_grad()
    def validation_loss(self, unet, ema: EMA | None) -> dict[str, float]:
        """Mean squared error of the prediction target at fixed t with fixed noise (comparable over time)."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process or self.latents is None:
            return {}
        model = self._ema_unet(unet, ema)
        denoise = unet_denoiser(model)
        out = {}
        for t in VAL_TIMESTEPS:
            g = torch.Generator().manual_seed(t)
            total = 0.0
            for lat, hid in zip(self.latents.split(64), self.hidden.split(64)):
                noise = torch.randn(lat.shape, generator=g).to(lat.device)
                ts = torch.full((len(lat),), t, device=lat.device, dtype=torch.long)
                noisy = self.objective.scheduler.add_noise(lat, noise, ts)
                target = self.objective.target(lat, noise, ts)
                total += (denoise(noisy, ts, hid) - target).pow(2).mean().item() * len(lat)
            out[f"val_loss_t{t}"] = total / len(self.latents)
        out["val_loss"] = sum(out.values()) / len(VAL_TIMESTEPS)
        return out

    def pipeline(self, unet, ema: EMA | None, use_ema: bool = True) -> LatentDiffusionPipeline:
        model = self._ema_unet(unet, ema) if use_ema else self.acc.unwrap_model(unet, keep_torch_compile=False)
        return LatentDiffusionPipeline.from_parts(
            model, self.cfg.vae, self.te, self.objective.cfg.schedule,
            default_sampler=self.cfg.sampler, unet_config=self.unet_config,
        )

    @torch.no_grad()
    def sample_grid(self, unet, ema: EMA | None, step: int) -> Path | None:
        """Fixed prompts x guidance scales with fixed seeds, one row per guidance scale."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process or not self.cfg.sample_prompts:
            return None
        pipe = self.pipeline(unet, ema)
        images, labels = [], []
        for scale in self.cfg.sample_guidance:
            res = pipe.generate(list(self.cfg.sample_prompts), steps=self.cfg.sample_steps, guidance_scale=scale,
                                seed=0)
            images += [r.image for r in res]
            labels += [f"g={scale:g} {p}" for p in self.cfg.sample_prompts]
        grid = labelled_grid(images, labels, ncol=len(self.cfg.sample_prompts))
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        path = self.out / "samples" / f"samples_{step:07d}.png"
        grid.save(path)
        grid.save(self.out / "samples.png")
        return path


def export(cfg, acc, unet, ema: EMA | None, evaluator: Evaluator, out: Path, training_config: dict) -> Path:
    """The composed pipeline folder (EMA weights), written by rank 0."""
    folder = out / "pipeline"
    if acc.is_main_process:
        pipe = evaluator.pipeline(unet, ema, use_ema=False)
        pipe.training_config = training_config
        manifest_id = pipe.save_pretrained(folder, ema_weights=ema.weights() if ema else None, overwrite=True)
        acc.print(f"saved {folder} (manifest {manifest_id[:12]})")
    acc.wait_for_everyone()
    return folder


def plot(out: Path) -> None:
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, ["loss", "mse", "grad_norm"], out / "loss_curves.png", "UNet: training", kind="train")
    plot_curves(records, ["val_loss", "val_loss_t250", "val_loss_t750"], out / "val_curves.png",
                "UNet: held-out loss (EMA)", kind="val")
