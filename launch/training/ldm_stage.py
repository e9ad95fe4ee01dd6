"""The pieces of stage-3 training that would crowd train_ldm.py: where a batch of latents and text
comes from (on the fly or cached), one optimizer step, held-out loss, sample grids, export."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel

from autoencoder.frozen import FrozenEncoder
from data import build_loader, iterate_once
from data.buckets import Bucket, bucket_name, resolve_buckets
from launch.evaluation.pictures import labelled_grid, plot_curves, titled_blocks
from launch.evaluation.recognisability import QualityCheck
from launch.training.config import RunConfig
from launch.training.ema import EMA, averaged_copy
from launch.training.guard import StepGuard
from launch.training.tracking import read_metrics
from ldm.cache import CacheSpec, cached_loader, ensure_cache, sample_latents
from ldm.conditioning import apply_dropout, dropout_mask
from ldm.objective import DiffusionObjective
from ldm.pipeline import LatentDiffusionPipeline
from ldm.unet import unet_denoiser
from text_encoder import FrozenTextEncoder, resolve_dtype

if TYPE_CHECKING:  # the command owns its config; imported for annotations only
    from PIL import Image

    from launch.train_ldm import TrainLDMConfig

VAL_TIMESTEPS = (50, 250, 500, 750, 950)


class Batches:
    """Endless (latents [B, C, h, w], text hidden [B, L, D]) pairs, cached or encoded on the fly.

    Both paths draw the latent sample from the same explicit generator (``mean + std * eps``), so
    switching caching on changes where the numbers come from, not which random stream they use.
    """

    def __init__(self, cfg: TrainLDMConfig, acc: Accelerator, vae: AutoencoderKL, text_encoder: FrozenTextEncoder,
                 vae_fingerprint: dict[str, Any]):
        self.acc, self.text_encoder = acc, text_encoder
        run = cfg.run
        self.cached_text = cfg.cache_text
        # The frozen encoder half, no autograd, in the device's fastest native precision (keyed in the cache).
        self.encoder = FrozenEncoder(vae, dtype=resolve_dtype("auto", acc.device))
        if cfg.cache_latents or cfg.cache_text:
            spec = CacheSpec(
                data=cfg.data, cache_dir=cfg.cache_dir or Path(run.output_dir) / "cache",
                vae_fingerprint=self.encoder.fingerprint(vae_fingerprint),
                text_fingerprint=text_encoder.fingerprint if cfg.cache_text else None, num_workers=run.num_workers,
                batch_size=run.eval_batch_size,
            )
            cache = ensure_cache(spec, vae=self.encoder, text_encoder=text_encoder if cfg.cache_text else None,
                                 rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone)
            self.loader = cached_loader(cache, cfg.data, batch_size=run.batch_size, seed=run.seed,
                                        rank=acc.process_index, world_size=acc.num_processes)
            self.cached = True
        else:
            self.loader = build_loader(cfg.data, batch_size=run.batch_size, seed=run.seed, rank=acc.process_index,
                                       world_size=acc.num_processes, num_workers=run.num_workers)
            self.cached = False
        self._it = iter(self.loader)

    def fetch(self) -> dict[str, Any]:
        """The next loader batch: pixels and captions on the fly, latent statistics (and text) cached."""
        return next(self._it)

    @staticmethod
    def size(batch: dict[str, Any]) -> int:
        """The number of samples B in a ``fetch``ed batch."""
        return len(batch["latent_mean"] if "latent_mean" in batch else batch["pixel_values"])

    @torch.no_grad()
    def condition(self, batch: dict[str, Any], latent_generator: torch.Generator, dropped: torch.Tensor,
                  null_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [B, C, h, w], text hidden [B, L, D]) in fp32 on the device, rows where ``dropped`` [B]
        is True holding ``null_hidden`` [1, L, D].

        On the fly only the kept captions are encoded: the dropped rows would be replaced anyway, so
        skipping them gives the same tensor with fewer text-encoder rows (every caption once; see
        ``ldm.conditioning``)."""
        device = self.acc.device
        if self.cached:
            latents = sample_latents(batch["latent_mean"], batch["latent_std"], latent_generator)
        else:
            posterior = self.encoder.encode(batch["pixel_values"].to(device)).latent_dist
            latents = posterior.sample(generator=latent_generator)
        latents = latents.to(device, torch.float32)
        if self.cached and self.cached_text:
            hidden = apply_dropout(batch["text_hidden"].to(device, torch.float32), null_hidden, dropped)
            return latents, hidden
        dropped = dropped.to(device)
        hidden = null_hidden.to(device, torch.float32).expand(len(dropped), -1, -1).clone()  # [B, L, D]
        kept = [c for c, d in zip(batch["captions"], dropped.tolist()) if not d]
        if kept:
            hidden[~dropped] = self.text_encoder.encode(kept).hidden.to(device, torch.float32)
        return latents, hidden


@dataclass
class UNetStep:
    """What one stage-3 optimizer step works on (``unet`` is the accelerate-prepared, maybe compiled, one)."""

    acc: Accelerator
    unet: torch.nn.Module
    objective: DiffusionObjective
    opt: torch.optim.Optimizer
    batches: Batches
    null_hidden: torch.Tensor  # [1, L, D], what a dropped caption becomes
    p_uncond: float
    gens: dict[str, torch.Generator]  # "latent", "dropout", "diffusion"
    run: RunConfig
    guard: StepGuard


def train_step(s: UNetStep, step: int) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimizer step over ``run.grad_accum_steps`` micro-batches; decisions agree on every rank.

    Returns (detached logs, step applied); a preemption request is recorded in ``s.guard``.
    """
    acc, unet, n = s.acc, s.unet, s.run.grad_accum_steps
    logs: dict[str, torch.Tensor] = {}
    denoise = unet_denoiser(unet)
    for i in range(n):
        batch = s.batches.fetch()
        # Caption dropout for classifier-free guidance: the one place it happens (Ho & Salimans 2022),
        # drawn before encoding so that dropped captions are never encoded.
        dropped = dropout_mask(s.batches.size(batch), s.p_uncond, s.gens["dropout"])  # [B] bool
        latents, cond = s.batches.condition(batch, s.gens["latent"], dropped, s.null_hidden)
        with acc.no_sync(unet) if i < n - 1 else nullcontext():
            with acc.autocast():
                loss, step_logs = s.objective.loss(denoise, latents, cond, s.gens["diffusion"])
            acc.backward(loss / n)
        step_logs = {**step_logs, "loss": loss.detach(), "dropped_fraction": dropped.float().mean()}
        for k, v in step_logs.items():
            logs[k] = logs.get(k, 0) + v.float() / n
    norm = acc.clip_grad_norm_(unet.parameters(), s.run.max_grad_norm or math.inf)
    applied, _ = s.guard.check(norm, step)
    if applied:
        s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    logs["grad_norm"] = norm.detach().float()
    return logs, applied


def compose_pipeline(cfg: TrainLDMConfig, unet: UNet2DConditionModel, vae: AutoencoderKL,
                     text_encoder: FrozenTextEncoder, objective: DiffusionObjective) -> LatentDiffusionPipeline:
    """The in-memory pipeline around a bare UNet and the already-loaded frozen stages (no disk reads)."""
    return LatentDiffusionPipeline(unet, vae, text_encoder, objective.cfg.schedule, vae_dir=cfg.vae,
                                   default_sampler=cfg.sampler, unet_config=cfg.unet)


def sample_grid_shapes(buckets: list[Bucket], histogram: dict[str, int] | None = None) -> list[tuple[Bucket, str]]:
    """The bucket shapes a sample grid shows, each with what it is: the most common bucket (with a
    histogram), the squarest, the widest and the tallest, each once. With a histogram only buckets
    that hold images are candidates (an SDXL preset lists 1:4 to 4:1 whatever the data has)."""
    counts = {b: (histogram or {}).get(bucket_name(b), 0) for b in buckets}
    total = sum(counts.values())
    pool = [b for b in buckets if counts[b]] if total else list(buckets)
    picks: list[tuple[Bucket, str]] = []
    if total:
        picks.append((max(pool, key=lambda b: counts[b]), "most common"))  # ties: the first in ratio order
    picks += [(min(pool, key=lambda b: abs(_log_ratio(b))), "squarest"), (max(pool, key=_log_ratio), "widest"),
              (min(pool, key=_log_ratio), "tallest")]
    roles: dict[Bucket, list[str]] = {}
    for bucket, role in picks:
        roles.setdefault(bucket, []).append(role)
    return [(b, ", ".join(r) + (f", {100 * counts[b] / total:.0f}% of images" if total else "")) for b, r in roles.items()]


def _log_ratio(bucket: Bucket) -> float:
    """log(W / H): 0 for a square bucket, positive for wide ones, negative for tall ones."""
    return math.log(bucket[0] / bucket[1])


class Evaluator:
    """Held-out loss at fixed timesteps and sample grids, with the EMA weights, on rank 0.

    With --data.buckets the grid shows a few bucket shapes (``sample_grid_shapes``), generated
    through the pipeline call users make (``height=``, ``width=``); ``bucket_histogram`` is the
    loader's samples per bucket, which picks the most common one."""

    def __init__(self, cfg: TrainLDMConfig, acc: Accelerator, vae: AutoencoderKL, text_encoder: FrozenTextEncoder,
                 objective: DiffusionObjective, out: Path, bucket_histogram: dict[str, int] | None = None):
        self.cfg, self.acc, self.vae, self.te, self.objective, self.out = cfg, acc, vae, text_encoder, objective, out
        self.batch_size = cfg.run.eval_batch_size
        buckets = resolve_buckets(cfg.data.buckets, cfg.data.resolution) if cfg.data.buckets else []
        self.grid_shapes = sample_grid_shapes(buckets, bucket_histogram) if buckets else []
        # Held-out (latents [b, C, h, w], text hidden [b, L, D]) batches; with buckets each holds one shape.
        self.val_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        if acc.is_main_process and cfg.val_data:
            self._load_validation(cfg)
        self.eval_unet: torch.nn.Module | None = None  # the EMA copy, refilled in place each time
        self.pipe: LatentDiffusionPipeline | None = None  # composed once around eval_unet
        self.quality_check: QualityCheck | None = None  # --eval-every: the benchmark's classifier and prompts
        if acc.is_main_process and cfg.eval_every:
            self.quality_check = QualityCheck.load(cfg.eval_classifier, cfg.data.source, cfg.eval_per_category,
                                                   cfg.eval_guidance, cfg.sample_steps)

    @torch.no_grad()
    def _load_validation(self, cfg: TrainLDMConfig) -> None:
        n = 0
        for batch in iterate_once(cfg.data.with_source(cfg.val_data), batch_size=self.batch_size):
            keep = min(len(batch["captions"]), cfg.val_samples - n)  # the first val_samples images
            latents = self.vae.encode(batch["pixel_values"][:keep].to(self.acc.device)).latent_dist.mean
            hidden = self.te.encode(list(batch["captions"][:keep])).hidden.float()
            self.val_batches.append((latents, hidden))
            n += keep
            if n >= cfg.val_samples:
                break

    def _ema_unet(self, unet: torch.nn.Module, ema: EMA | None) -> UNet2DConditionModel:
        raw = self.acc.unwrap_model(unet, keep_torch_compile=False)
        self.eval_unet = averaged_copy(raw, ema, into=self.eval_unet)
        return self.eval_unet

    @torch.no_grad()
    def validation_loss(self, unet: torch.nn.Module, ema: EMA | None) -> dict[str, float]:
        """Mean squared error of the prediction target at fixed t with fixed noise (comparable over time)."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process or not self.val_batches:
            return {}
        model = self._ema_unet(unet, ema)
        denoise = unet_denoiser(model)
        out, count = {}, sum(len(lat) for lat, _ in self.val_batches)
        for t in VAL_TIMESTEPS:
            g = torch.Generator().manual_seed(t)
            total = 0.0
            for lat, hid in self.val_batches:
                noise = torch.randn(lat.shape, generator=g).to(lat.device)
                noisy, ts, target = self.objective.validation_pair(lat, noise, t)  # eps, v and flow alike
                total += (denoise(noisy, ts, hid) - target).pow(2).mean().item() * len(lat)
            out[f"val_loss_t{t}"] = total / count
        out["val_loss"] = sum(out.values()) / len(VAL_TIMESTEPS)
        return out

    @torch.no_grad()
    def sample_grid(self, unet: torch.nn.Module, ema: EMA | None, step: int) -> Path | None:
        """Fixed prompts x guidance scales with fixed seeds, one row per guidance scale; with buckets,
        one such block per shape of ``grid_shapes``, titled with its WxH."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process or not self.cfg.sample_prompts:
            return None
        model = self._ema_unet(unet, ema)
        if self.pipe is None:
            self.pipe = compose_pipeline(self.cfg, model, self.vae, self.te, self.objective)
        if self.grid_shapes:
            grid = titled_blocks([(f"{bucket_name(b)} ({what})", self._prompt_grid(b)) for b, what in self.grid_shapes])
        else:
            grid = self._prompt_grid(None)
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        path = self.out / "samples" / f"samples_{step:07d}.png"
        grid.save(path)
        grid.save(self.out / "samples.png")
        return path

    def _prompt_grid(self, bucket: Bucket | None) -> Image.Image:
        """The prompts x guidance-scale grid at `bucket` (W, H) pixels, or the pipeline's default size."""
        width, height = bucket if bucket is not None else (None, None)
        images, labels = [], []
        for scale in self.cfg.sample_guidance:
            res = self.pipe.generate(list(self.cfg.sample_prompts), steps=self.cfg.sample_steps,
                                     guidance_scale=scale, seed=0, height=height, width=width)
            images += [r.image for r in res]
            labels += [f"g={scale:g} {p}" for p in self.cfg.sample_prompts]
        return labelled_grid(images, labels, ncol=len(self.cfg.sample_prompts))

    @torch.no_grad()
    def quality(self, unet: torch.nn.Module, ema: EMA | None) -> dict[str, float]:
        """Recognisability scores of the EMA weights (benchmarks/demo_quality.py's, fewer prompts); rank 0."""
        self.acc.wait_for_everyone()
        if self.quality_check is None:
            return {}
        model = self._ema_unet(unet, ema)
        if self.pipe is None:
            self.pipe = compose_pipeline(self.cfg, model, self.vae, self.te, self.objective)
        return self.quality_check(self.pipe)


def export(cfg: TrainLDMConfig, acc: Accelerator, unet: torch.nn.Module, ema: EMA | None, vae: AutoencoderKL,
           text_encoder: FrozenTextEncoder, objective: DiffusionObjective, out: Path,
           training_config: dict[str, Any]) -> Path:
    """The composed pipeline folder with the EMA weights, written by rank 0."""
    folder = out / "pipeline"
    if acc.is_main_process:
        final = averaged_copy(acc.unwrap_model(unet, keep_torch_compile=False), ema)
        pipe = compose_pipeline(cfg, final, vae, text_encoder, objective)
        pipe.training_config = training_config
        manifest_id = pipe.save_pretrained(folder, overwrite=True)
        acc.print(f"saved {folder} (manifest {manifest_id[:12]})")
    acc.wait_for_everyone()
    return folder


def plot(out: Path) -> None:
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, ["loss", "mse", "grad_norm"], out / "loss_curves.png", "UNet: training", kind="train")
    plot_curves(records, ["val_loss", "val_loss_t250", "val_loss_t750"], out / "val_curves.png",
                "UNet: held-out loss (EMA)", kind="val")
