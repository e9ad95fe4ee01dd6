"""Writing a pipeline folder, and loading its autoencoder and text encoder back with checks.

Layout written (the one ``StableDiffusionPipeline.save_pretrained`` writes, so stock diffusers loads it):

    model_index.json            StableDiffusionPipeline; safety_checker/feature_extractor null
    unet/                       UNet2DConditionModel (config.json + safetensors)
    vae/                        the autoencoder folder copied byte for byte (latent_contract.json kept)
    text_encoder/ tokenizer/    FrozenTextEncoder.export_transformers
    scheduler/                  the default sampler, built from the training noise schedule, plus the
                                keys every other sampler reads (ldm.stock_schedulers)
    ldm_manifest.json           written last: files + sha256, manifest id, stage fingerprints,
                                latent statistics, null-embedding mode, schedule, training config
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from autoencoder import LatentContract, load_autoencoder
from autoencoder.folder import read_latent_contract
from foundation import atomic_folder, write_json_atomic
from text_encoder import FrozenTextEncoder, check_fingerprint, load_text_encoder

from ldm.cli import to_dict
from ldm.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PipelineFolderError,
    PipelineMismatchError,
    file_digests,
    manifest_id,
)
from ldm.objective import NoiseScheduleConfig
from ldm.samplers import build_sampler
from ldm.stock_schedulers import check_stock_swaps, stock_scheduler_config
from ldm.unet import UNetConfig

logger = logging.getLogger(__name__)

LATENT_CONTRACT_NAME = "latent_contract.json"  # the autoencoder stage's own file (ARCHITECTURE.md)
# Prompts used to check that the exported text encoder reproduces the training one.
_EXPORT_PROBES = ["", "a yellow smiling face"]


def load_vae(vae_dir: Path, device: torch.device | str, dtype: torch.dtype) -> tuple[AutoencoderKL, LatentContract]:
    """The stage-1 autoencoder (weights verified against its contract) and its latent contract.

    The pipeline decodes ``latents / scaling_factor`` like stock diffusers, which is only right when
    the latent normalisation is folded into the weights (scaling_factor 1.0, ARCHITECTURE.md).
    """
    vae, contract = load_autoencoder(vae_dir)
    if not contract.folded:
        raise PipelineMismatchError(
            f"the autoencoder in {vae_dir} does not have its latent statistics folded into its weights; "
            "stock diffusers pipelines would decode unnormalised latents. Fold them (fold_latent_statistics) "
            "when saving stage 1."
        )
    vae = vae.to(device)
    if vae.dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        vae = vae.to(dtype=dtype)
    return vae.eval(), contract


def load_text_encoder_from(
    folder: Path, manifest: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype
) -> FrozenTextEncoder:
    """The pipeline's own text_encoder/ + tokenizer/, checked against the manifest's fingerprint."""
    info = manifest["text_encoder"]
    encoder = load_text_encoder(f"hf:{folder}", device=device, dtype=dtype, null=info["null_embedding"])
    check_fingerprint(info["fingerprint"], encoder.fingerprint, context=f"the pipeline in {folder}", ignore=("dtype",))
    return encoder


def write_pipeline(
    out_dir: Path,
    *,
    unet: UNet2DConditionModel,
    vae_dir: Path,
    text_encoder: FrozenTextEncoder,
    schedule: NoiseScheduleConfig,
    default_sampler: str,
    unet_config: UNetConfig | None,
    training_config: Mapping[str, Any],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the whole folder into a temporary sibling, manifest last, then rename it into place."""
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(
            f"save expects a bare UNet2DConditionModel, got {type(unet).__name__}; "
            "unwrap it first (accelerator.unwrap_model)"
        )
    if not all(p.is_contiguous() for p in unet.parameters()):  # channels-last training: safetensors wants dense rows
        unet = copy.deepcopy(unet).to(memory_format=torch.contiguous_format)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        _copy_vae(Path(vae_dir), tmp / "vae")
        contract = read_latent_contract(tmp / "vae")  # the copy, re-verified against its sha256
        text_encoder.export_transformers(tmp)
        scheduler_config = stock_scheduler_config(schedule, default_sampler)
        stock_swaps = check_stock_swaps(schedule, scheduler_config)
        (tmp / "scheduler").mkdir()
        write_json_atomic(tmp / "scheduler" / "scheduler_config.json", scheduler_config)
        write_json_atomic(tmp / "model_index.json", _model_index(text_encoder, default_sampler, schedule))
        exported_fingerprint = _check_export(tmp, text_encoder)
        files = file_digests(tmp)
        vae_config = json.loads((tmp / "vae" / "config.json").read_text())
        manifest = {
            "format": MANIFEST_FORMAT,
            "manifest_id": manifest_id(files),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__},  # fmt: skip
            "files": files,
            "schedule": to_dict(schedule),
            "default_sampler": default_sampler,
            "unet": {
                "config": to_dict(unet_config) if unet_config is not None else None,
                "parameters": sum(p.numel() for p in unet.parameters()),
            },
            "autoencoder": {
                "factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
                "latent_channels": vae_config["latent_channels"],
                "scaling_factor": vae_config.get("scaling_factor", 1.0),
                "latent_contract": contract.to_json_dict(),  # latent statistics, weights sha256
            },
            "text_encoder": {
                "fingerprint": exported_fingerprint,  # what from_pretrained compares against
                "training_fingerprint": text_encoder.fingerprint,  # the encoder the UNet trained with
                "spec": text_encoder.config.to_spec(),
                "null_embedding": text_encoder.config.null,
                "max_length": text_encoder.max_length,
                "hidden_size": text_encoder.hidden_size,
            },
            "training": to_dict(dict(training_config)),
            "stock_diffusers": _stock_notes(text_encoder, stock_swaps),
        }
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return manifest


def _stock_notes(text_encoder: FrozenTextEncoder, stock_swaps: dict[str, Any]) -> dict[str, Any]:
    """How a stock StableDiffusionPipeline reproduces ``ldm-generate``: per sampler, the scheduler class
    and the ``from_config`` keywords it needs (almost always none); and what to pass for the
    unconditional branch. With ``null=zeros`` stock diffusers would encode "" there, which is not
    what the model was trained with, and no saved file can change that: the caller must pass
    ``negative_prompt_embeds=torch.zeros(batch, max_length, hidden_size)`` (README "Loading the
    result in diffusers")."""
    if text_encoder.config.null == "zeros":
        logger.warning(
            "this pipeline was trained with null=zeros: stock diffusers pipelines encode \"\" for the "
            "unguided branch unless given negative_prompt_embeds=torch.zeros(batch, %d, %d) "
            "(ldm_manifest.json stock_diffusers.unconditional)",
            text_encoder.max_length, text_encoder.hidden_size,
        )  # fmt: skip
        unconditional = {
            "negative_prompt_embeds": "zeros",
            "shape": ["batch", text_encoder.max_length, text_encoder.hidden_size],
            "note": "pass negative_prompt_embeds=torch.zeros(shape) when no negative prompt is given; "
            "stock diffusers would otherwise encode the empty prompt, which this model never saw",
        }
    else:
        unconditional = {"negative_prompt_embeds": "default (the empty prompt, as stock diffusers encodes it)"}
    return {"schedulers": stock_swaps, "unconditional": unconditional}


def _copy_vae(vae_dir: Path, dest: Path) -> None:
    """Copy the stage-1 folder's JSON and safetensors files byte for byte (its contract hashes them)."""
    if not (vae_dir / LATENT_CONTRACT_NAME).is_file():
        raise PipelineFolderError(
            f"{vae_dir} has no {LATENT_CONTRACT_NAME}: give the autoencoder folder written by stage 1 "
            "(launch/train_vae.py), not a bare diffusers AutoencoderKL folder"
        )
    dest.mkdir(parents=True)
    for path in sorted(vae_dir.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            shutil.copy2(path, dest / path.name)


def _model_index(text_encoder: FrozenTextEncoder, default_sampler: str, schedule: NoiseScheduleConfig) -> dict[str, Any]:
    """What StableDiffusionPipeline.save_pretrained writes for these components (diffusers 0.42)."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(build_sampler(default_sampler, schedule)).__name__],
        "text_encoder": ["transformers", type(text_encoder.model).__name__],
        "tokenizer": ["transformers", type(text_encoder.tokenizer).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _check_export(folder: Path, text_encoder: FrozenTextEncoder) -> dict[str, Any]:
    """Reload the exported encoder as stock diffusers would see it; it must embed like the original."""
    exported = load_text_encoder(
        f"hf:{folder}", device=text_encoder.device, dtype=text_encoder.dtype, null=text_encoder.config.null
    )
    a = text_encoder.encode(_EXPORT_PROBES).hidden.float()
    b = exported.encode(_EXPORT_PROBES).hidden.float()
    tol = 1e-5 if text_encoder.dtype == torch.float32 else 1e-2
    if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol):
        raise RuntimeError(
            "the exported text_encoder/ + tokenizer/ do not reproduce the training text encoder's "
            f"embeddings (max difference {(a - b).abs().max().item() if a.shape == b.shape else 'shape'}); "
            "stock diffusers would condition the UNet differently. This is a text_encoder export bug."
        )
    return exported.fingerprint
