"""LoRA for the stage-3 UNet: low-rank adapters on its attention projections, through peft.

Hu et al. 2021 (LoRA): a frozen weight ``W`` gets a trainable update ``(alpha / r) B A`` with
``A`` [r, in], ``B`` [out, r], ``B`` = 0 at the start, so training begins exactly at the source
UNet. diffusers integrates peft (``unet.add_adapter``), which is what we use, on the projections
of every attention block (``to_q``, ``to_k``, ``to_v``, ``to_out.0``: self- and cross-attention),
as diffusers' own ``train_text_to_image_lora.py`` does.

The export is diffusers' LoRA format (``pytorch_lora_weights.safetensors`` with ``unet.``-prefixed
keys and the adapter's config in its metadata), so stock
``StableDiffusionPipeline.load_lora_weights(DIR)`` loads it, plus ``lora_manifest.json`` naming the
base pipeline it was trained on. ``merged_unet`` folds the adapter into a plain UNet for a full
pipeline folder.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from foundation import atomic_folder, sha256_file, write_json_atomic


ADAPTER_NAME = "lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
LORA_MANIFEST = "lora_manifest.json"
LORA_FORMAT = "ldm-lora/1"


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the UNet's attention projections."""

    rank: int = 0
    """Rank r of each adapter; 0 trains the whole UNet instead."""
    alpha: float | None = None
    """Scale numerator: updates are (alpha / r) B A. None means alpha = r (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Module names (suffixes) that get adapters: the attention projections."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0 (0: no LoRA), got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def add_lora(unet: UNet2DConditionModel, cfg: LoRAConfig, seed: int = 0) -> int:
    """Freeze ``unet`` and add adapters (in place); returns the number of trainable parameters.

    ``A`` is initialised from a generator seeded ``seed`` (peft draws it from the global RNG), ``B``
    is zero, so the adapted UNet computes exactly what ``unet`` did.
    """
    from peft import LoraConfig

    if not cfg.enabled:
        raise ValueError("add_lora needs LoRAConfig.rank >= 1")
    unet.requires_grad_(False)
    devices = [unet.device.index or 0] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                            init_lora_weights="gaussian", target_modules=list(cfg.target_modules))
        try:
            unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"LoRA target_modules {cfg.target_modules} matched no module of the UNet ({e})") from e
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:  # adapters train in float32 even when the frozen UNet is half precision
        p.data = p.data.float()
    return sum(p.numel() for p in trainable)


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter weights with diffusers' key names (``...to_q.lora_A.weight``), float32, CPU."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def save_lora(unet: UNet2DConditionModel, out_dir: str | Path, base: dict[str, Any] | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Write the adapter atomically in diffusers' LoRA format + ``lora_manifest.json``; returns the manifest.

    ``base`` describes the pipeline the adapter was trained on (its manifest id and init-from record).
    """
    from diffusers import StableDiffusionPipeline

    peft_config = unet.peft_config[ADAPTER_NAME]
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.to_dict().items()}
    metadata = json.loads(json.dumps(metadata, default=str))
    with atomic_folder(Path(out_dir), overwrite=overwrite) as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora_state_dict(unet),
                                                  unet_lora_adapter_metadata=metadata, safe_serialization=True)
        manifest = {
            "format": LORA_FORMAT,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rank": peft_config.r, "alpha": peft_config.lora_alpha, "target_modules": sorted(peft_config.target_modules),
            "files": {LORA_WEIGHTS: sha256_file(tmp / LORA_WEIGHTS)},
            "base": base or {},
        }
        write_json_atomic(tmp / LORA_MANIFEST, manifest)
    return manifest


def load_lora(unet: UNet2DConditionModel, lora_dir: str | Path, scale: float = 1.0) -> dict[str, Any]:
    """Apply a saved adapter to ``unet`` (in place) at ``scale``; returns its manifest (``{}`` if stock)."""
    lora_dir = Path(lora_dir)
    weights = lora_dir / LORA_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"--lora {lora_dir}: no {LORA_WEIGHTS} (give the folder a LoRA run exported)")
    manifest: dict[str, Any] = {}
    if (lora_dir / LORA_MANIFEST).is_file():
        manifest = json.loads((lora_dir / LORA_MANIFEST).read_text(encoding="utf-8"))
        if manifest["files"].get(LORA_WEIGHTS) != sha256_file(weights):
            raise ValueError(f"--lora {lora_dir}: {LORA_WEIGHTS} does not match the sha256 in {LORA_MANIFEST}")
    unet.load_lora_adapter(str(lora_dir), prefix="unet", adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHTS,
                           use_safetensors=True)
    unet.set_adapters([ADAPTER_NAME], weights=[scale])
    return manifest


def merged_unet(unet: UNet2DConditionModel, scale: float = 1.0) -> UNet2DConditionModel:
    """A plain UNet (no peft layers) computing ``unet`` with its adapter at ``scale``; ``unet`` is unchanged."""
    out = copy.deepcopy(unet)
    out.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
    out.unload_lora()
    out.requires_grad_(True)
    return out


def unet_without_lora(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain copy of the base UNet the adapter sits on (its weights untouched by LoRA training)."""
    out = copy.deepcopy(unet)
    out.unload_lora()
    out.requires_grad_(True)
    return out


def export_lora_run(unet: UNet2DConditionModel, compose: Callable[[UNet2DConditionModel], Any], out_dir: Path,
                    base: dict[str, Any] | None, merge: bool) -> Path:
    """A LoRA run's outputs: ``pipeline/`` (the base UNet, for ``ldm-generate --lora``), ``lora/`` (the
    adapter) and, with ``merge``, ``pipeline_merged/``. ``compose`` turns a plain UNet into a pipeline."""
    out_dir = Path(out_dir)
    base_id = compose(unet_without_lora(unet)).save_pretrained(out_dir / "pipeline", overwrite=True)
    save_lora(unet, out_dir / "lora", base={**(base or {}), "pipeline_manifest_id": base_id}, overwrite=True)
    if merge:
        compose(merged_unet(unet)).save_pretrained(out_dir / "pipeline_merged", overwrite=True)
    return out_dir / "pipeline"


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
