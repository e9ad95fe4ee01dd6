"""Writing a pipeline folder, and loading its autoencoder and text encoder back with checks.

Layout written (the one ``StableDiffusionPipeline.save_pretrained`` writes, so stock diffusers loads it):

    model_index.json            StableDiffusionPipeline; safety_checker/feature_extractor null
    unet/                       UNet2DConditionModel (config.json + safetensors)
    vae/                        the autoencoder folder copied byte for byte (latent_contract.json kept)
    text_encoder/ tokenizer/    FrozenTextEncoder.export_transformers
    scheduler/                  the default sampler, built from the training noise schedule
    ldm_manifest.json           written last: files + sha256, manifest id, stage fingerprints,
                                latent statistics, null-embedding mode, schedule, training config
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from text_encoder import FrozenTextEncoder, check_fingerprint, load_text_encoder

from ldm.cli import to_dict
from ldm.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PipelineFolderError,
    atomic_folder,
    file_digests,
    manifest_id,
    write_json,
)
from ldm.objective import NoiseScheduleConfig
from ldm.samplers import build_sampler
from ldm.unet import UNetConfig

LATENT_CONTRACT_NAME = "latent_contract.json"  # the autoencoder stage's own file (ARCHITECTURE.md)
VAE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Prompts used to check that the exported text encoder reproduces the training one.
_EXPORT_PROBES = ["", "a yellow smiling face"]


def load_vae(vae_dir: Path, device: torch.device | str, dtype: torch.dtype) -> AutoencoderKL:
    """The diffusers AutoencoderKL in ``vae_dir``; safetensors only."""
    for name in ("config.json", VAE_WEIGHTS_NAME):
        if not (vae_dir / name).is_file():
            raise PipelineFolderError(
                f"{vae_dir} has no {name}: expected an autoencoder folder (diffusers AutoencoderKL "
                "config.json + safetensors) as written by the autoencoder stage"
            )
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, torch_dtype=dtype)
    return vae.to(device).eval()


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
    ema: bool,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the whole folder into a temporary sibling, manifest last, then rename it into place."""
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(
            f"save expects a bare UNet2DConditionModel, got {type(unet).__name__}; "
            "unwrap it first (accelerator.unwrap_model)"
        )
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        contract = _copy_vae(Path(vae_dir), tmp / "vae")
        text_encoder.export_transformers(tmp)
        build_sampler(default_sampler, schedule).save_pretrained(tmp / "scheduler")
        write_json(tmp / "model_index.json", _model_index(text_encoder, default_sampler, schedule))
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
                "ema": ema,
            },
            "autoencoder": {
                "factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
                "latent_channels": vae_config["latent_channels"],
                "scaling_factor": vae_config.get("scaling_factor", 1.0),
                "latent_contract": contract,  # per-channel latent statistics + fingerprint, if present
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
        }
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def _copy_vae(vae_dir: Path, dest: Path) -> dict[str, Any] | None:
    """Copy the autoencoder folder's JSON and safetensors files unchanged; return its latent contract."""
    for path in (vae_dir / "config.json", vae_dir / VAE_WEIGHTS_NAME):
        if not path.is_file():
            raise PipelineFolderError(
                f"{vae_dir} has no {path.name}: give the autoencoder folder written by the autoencoder stage"
            )
    dest.mkdir(parents=True)
    for path in sorted(vae_dir.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            shutil.copy2(path, dest / path.name)
    contract = dest / LATENT_CONTRACT_NAME
    return json.loads(contract.read_text()) if contract.is_file() else None


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
