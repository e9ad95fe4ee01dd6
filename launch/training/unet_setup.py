"""Stage 3's trained model: SRC's UNet (``--init-from``) or a fresh one, LoRA adapters on it, and the
export of a LoRA run. Kept out of ``train_ldm.train`` so that it reads as the loop it is."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel

from autoencoder import LatentContract
from launch.training import ldm_stage
from launch.training.ema import EMA, averaged_copy
from ldm.init_from import InitFromError, InitialUNet, unet_from_source
from ldm.lora import LoRAConfig, add_lora, export_lora_run
from ldm.objective import DiffusionObjective
from ldm.unet import build_unet, check_resolution
from text_encoder import FingerprintMismatch, FrozenTextEncoder

if TYPE_CHECKING:  # the command owns its config; imported for annotations only
    from launch.train_ldm import TrainLDMConfig


def trained_unet(cfg: TrainLDMConfig, acc: Accelerator, text_encoder: FrozenTextEncoder,
                 contract: LatentContract) -> tuple[UNet2DConditionModel, InitialUNet | None]:
    """The UNet this run trains, cross-attending to the text encoder's width; with ``--init-from``
    ``cfg.unet`` becomes SRC's architecture. Stages that do not fit end the run with one sentence."""
    torch.manual_seed(cfg.run.seed)  # diffusers initialises weights from the global RNG; nothing else uses it
    init = None
    if cfg.init_from:
        try:
            init = unet_from_source(cfg.init_from, text_encoder, contract.to_json_dict(), contract.latent_channels,
                                    cfg.unet.sample_size, cfg.allow_new_autoencoder)
        except (InitFromError, FingerprintMismatch) as e:  # stages that do not fit: a sentence, not a traceback
            raise SystemExit(f"error: {e}") from None
        unet, cfg.unet = init.unet, init.config
        for warning in init.warnings:
            acc.print(f"warning: {warning}")
    else:
        unet = build_unet(cfg.unet, text_encoder.hidden_size, contract.latent_channels)
    if cfg.lora_rank:
        trainable = add_lora(unet, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha), seed=cfg.run.seed)
        acc.print(f"LoRA rank {cfg.lora_rank}: {trainable:,} of {sum(p.numel() for p in unet.parameters()):,} parameters train")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        check_resolution(cfg.data.resolution, contract.downsample_factor, cfg.unet)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return unet, init


def export_lora(cfg: TrainLDMConfig, acc: Accelerator, unet: torch.nn.Module, ema: EMA | None, vae: AutoencoderKL,
                text_encoder: FrozenTextEncoder, objective: DiffusionObjective, out: Path,
                training_config: dict[str, Any]) -> Path:
    """OUTPUT/lora (the EMA adapter, diffusers' LoRA format), OUTPUT/pipeline (its base UNet), and
    OUTPUT/pipeline_merged with --lora-merge; written by rank 0."""
    if acc.is_main_process:
        final = averaged_copy(acc.unwrap_model(unet, keep_torch_compile=False), ema)

        def compose(plain_unet: UNet2DConditionModel):
            pipe = ldm_stage.compose_pipeline(cfg, plain_unet, vae, text_encoder, objective)
            pipe.training_config = training_config
            return pipe

        export_lora_run(final, compose, out, base=training_config.get("init_from_source"), merge=cfg.lora_merge)
        acc.print(f"saved {out / 'lora'} (adapter) and {out / 'pipeline'} (its base)")
    acc.wait_for_everyone()
    return out / "pipeline"
