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
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python launch/train_vae.py` / `accelerate launch launch/train_vae.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig
from autoencoder.discriminator import build_discriminator
from autoencoder.folder import save_autoencoder
from autoencoder.losses import AUTOENCODER_LOSS_PRESETS, AutoencoderLoss, AutoencoderLossConfig
from data import DataConfig, build_loader
from launch.training import vae_stage
from launch.training.accelerator import make_generators, setup_accelerator
from launch.training.checkpoint import TrainState
from launch.training.config import RunConfig, below, optimizer_problems
from launch.training.ema import EMA, averaged_copy
from launch.training.optim import GradScalerState, make_lr_schedule
from launch.training.run import TrainingRun, already_finished
from launch.training.vae_stage import AutoencoderStep
from ldm.cli import parse_config, to_dict


@dataclass
class TrainVAEConfig:
    """Train a KL autoencoder (stage 1) on captioned or uncaptioned images."""

    data: DataConfig = field(default_factory=lambda: DataConfig(resolution=64, missing_caption="empty"))
    """The training images (--data SPEC is short for --data.source SPEC); captions are not needed."""
    val_data: str = ""
    """--data spec of a held-out set for PSNR/SSIM and reconstruction grids; empty: none."""
    model: AutoencoderConfig = field(default_factory=lambda: AUTOENCODER_PRESETS["small"])
    """Shape of the autoencoder (its block count sets the downsampling factor)."""
    loss: AutoencoderLossConfig = field(default_factory=lambda: AUTOENCODER_LOSS_PRESETS["small"])
    """Reconstruction, KL, LPIPS and GAN terms."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir=Path("runs/vae")))
    """Steps, batch, precision, checkpoints, logging: what every training run shares."""
    lr: float = 1e-3
    """Peak AdamW learning rate of the autoencoder (after warmup)."""
    disc_lr: float = 2e-4
    """Peak AdamW learning rate of the discriminator (its warmup starts when the GAN switches on)."""
    adam_betas: tuple[float, float] = (0.5, 0.9)
    """AdamW's (beta1, beta2), for both optimizers."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay of the autoencoder."""
    val_every: int = 250
    """Validation (PSNR, SSIM, reconstruction grid) every this many steps, and at the end (a periodic one the end would repeat within half of this is skipped)."""
    val_samples: int = 256
    """Held-out images validated (the first ones of --val-data)."""
    stats_samples: int = 4096
    """Images used to measure the per-channel latent statistics at the end (0: all)."""
    init_from: str = ""
    """Fine-tune a pretrained autoencoder (SRC as for import_vae.py: AutoencoderKL or pipeline folder, hf:ORG/NAME[/vae], FILE.safetensors); its architecture replaces --model."""
    init_from_config: Path | None = None
    """The diffusers config.json of a single-file --init-from."""
    decoder_only: bool = False
    """With --init-from: train the decoder alone; the encoder, and so the latent space, stay the source's."""

    def __post_init__(self) -> None:
        # Every field checked at parse time, the resolution against the model's downsampling factor too.
        problems = optimizer_problems(self.lr, self.adam_betas, self.weight_decay)
        if not (math.isfinite(self.disc_lr) and self.disc_lr > 0):
            problems.append(f"disc_lr={self.disc_lr} must be a positive number")
        problems += below(self, 1, "val_every", "val_samples") + below(self, 0, "stats_samples")
        factor = self.model.downsample_factor
        if self.data.resolution % factor:
            problems.append(f"data.resolution={self.data.resolution} must be a multiple of the autoencoder's "
                            f"downsampling factor {factor} ({len(self.model.block_out_channels)} blocks)")
        if problems:
            raise ValueError("Invalid train_vae options: " + "; ".join(problems) + ".")


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
    # Latent statistics from 1,024 images, not all 3,415 of the emoji set: on the demo's autoencoder the
    # first 1,024 give each channel's mean within 0.006 std and its std within 1.3% of the full set's,
    # and the export's pass takes ~7 s instead of ~22 s of stage 1's wall time on 2 cores.
    "small": _preset("small", 64, lr=1e-3, stats_samples=1024,
                     run=RunConfig(output_dir=Path("runs/vae"), max_steps=1000, batch_size=8, warmup_steps=50, ema_decay=0.99,
                                   checkpoint_every=250, log_every=25)),
    "kl-f8": _preset("kl-f8", 256, lr=4.5e-6 * 8, run=RunConfig(max_steps=200_000, batch_size=8, mixed_precision="bf16")),
    "kl-f4": _preset("kl-f4", 256, lr=4.5e-6 * 8, run=RunConfig(max_steps=200_000, batch_size=8, mixed_precision="bf16")),
}


def train(cfg: TrainVAEConfig) -> Path:
    run = cfg.run
    acc = setup_accelerator(run)
    out = Path(run.output_dir)
    if already_finished(acc, out / "model", run):
        return out / "model"

    # Data: our own per-rank split, so the data position is ours to checkpoint.
    loader = build_loader(cfg.data, batch_size=run.batch_size, seed=run.seed, rank=acc.process_index,
                          world_size=acc.num_processes, num_workers=run.num_workers)

    # Models and optimizers; the generator optimizer holds the network and the output log-variance.
    model, kept = vae_stage.trained_autoencoder(cfg, acc)  # kept: the contract --decoder-only keeps
    disc = build_discriminator(cfg.loss.discriminator)
    loss_fn = AutoencoderLoss(cfg.loss).to(acc.device)
    opt_g = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=cfg.adam_betas)
    sched_g, sched_d = make_lr_schedule(opt_g, run), make_lr_schedule(opt_d, run)
    model, disc, opt_g, opt_d = acc.prepare(model, disc, opt_g, opt_d)
    raw = acc.unwrap_model(model)
    ema = EMA(raw, run.ema_decay, run.ema_sigma_rel).to(acc.device) if run.ema_decay > 0 else None

    gens = make_generators(run.seed, acc.process_index, ["posterior"], device=acc.device)
    state = TrainState(
        modules={"autoencoder": raw, "discriminator": acc.unwrap_model(disc), **({"ema": ema} if ema else {})},
        optimizers={"autoencoder": opt_g, "discriminator": opt_d},
        shared={"lr_autoencoder": sched_g, "lr_discriminator": sched_d, "grad_scaler": GradScalerState(acc)},
        generators=gens, per_rank={"data": loader},
    )
    tr = TrainingRun(acc, run, state, what="stage 1: autoencoder", config=to_dict(cfg))
    step = AutoencoderStep(acc, model, disc, loss_fn, opt_g, opt_d, gens["posterior"], run, tr.guard)
    val = vae_stage.Validator(cfg, acc, out) if cfg.val_data else None
    if cfg.init_from:
        acc.print(f"--init-from {cfg.init_from} was not reapplied: resumed from this run's own checkpoint" if tr.resumed_from
                  else f"autoencoder from --init-from {cfg.init_from}; the EMA starts from these weights")
    batches = iter(loader)

    while tr.running:
        xs = vae_stage.micro_batches(batches, run.grad_accum_steps, acc.device)
        logs, applied = vae_stage.train_step(step, xs, tr.step)
        if applied:  # a skipped (non-finite) step advances neither the schedules nor the EMA
            sched_g.step()
            if loss_fn.discriminator_active(tr.step):
                sched_d.step()  # its warmup starts when the GAN switches on
            if ema is not None:
                ema.update(raw)
        tr.end_step(logs)
        tr.log_training(lr=sched_g.get_last_lr()[0], show="reconstruction")
        if val is not None and tr.evaluation_due(cfg.val_every):
            scores = val.run(model, ema, tr.step)
            tr.log_validation(scores, f"validation {vae_stage.describe(scores)}")
        tr.save_checkpoint_if_due()
    tr.end_loop(raw, "autoencoder")
    if tr.preempted:
        tr.exit_preempted()

    if cfg.decoder_only and kept is not None:
        model_dir = _export_keeping_latents(acc, model, ema, out, kept)
    else:
        model_dir = vae_stage.export(cfg, acc, model, ema, out)
    tr.mark_finished(model_dir)
    if acc.is_main_process:
        vae_stage.plot(out)
    tr.close()
    return model_dir


def _export_keeping_latents(acc, model, ema, out: Path, contract) -> Path:
    """--decoder-only from a stage-1 folder: its encoder and folded statistics are unchanged, so its
    latent contract is kept as it is (no re-measuring): a UNet trained on its latents keeps working."""
    model_dir = out / "model"
    if acc.is_main_process:
        final = averaged_copy(acc.unwrap_model(model), ema)
        save_autoencoder(final.vae, contract, model_dir, overwrite=True)
        acc.print(f"saved {model_dir} (decoder fine-tuned; latent contract of --init-from kept)")
    acc.wait_for_everyone()
    return model_dir


def main(args: list[str] | None = None) -> None:
    train(parse_config(TrainVAEConfig, PRESETS, args=args, default_preset="small"))


if __name__ == "__main__":
    main()
