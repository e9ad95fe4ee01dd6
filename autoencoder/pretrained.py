"""Autoencoders trained elsewhere (SD's ``sd-vae-ft-mse``, the SDXL VAE, the FLUX/SD3 16-channel VAE).

A source spec (``--source SRC`` of ``launch/import_vae.py`` and ``train_vae.py --init-from``) is one of

    DIR                     an ``AutoencoderKL`` folder (config.json + diffusion_pytorch_model.safetensors)
    DIR                     a pipeline folder (model_index.json): its ``vae/`` is used
    hf:ORG/NAME             a Hub repository: an AutoencoderKL at its root, else its ``vae/``
    hf:ORG/NAME/SUB         the AutoencoderKL in subfolder SUB (``hf:ORG/NAME/vae``)
    FILE.safetensors        one weights file, diffusers or original (LDM/BFL) key names, with the
                            diffusers config.json given by ``config`` (or a config.json beside it)

``hf:`` specs take ``?revision=COMMIT`` to pin the weights. Only safetensors are read, never pickle.
``load_pretrained_autoencoder`` returns the float32 model and a JSON-ready ``source`` record (where
the weights came from, their sha256, and the source's own ``scaling_factor``/``shift_factor``/
``latents_mean``/``latents_std``) that the import writes into the latent contract.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch import nn

from foundation import sha256_file
from autoencoder.model import AutoencoderConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The source's own latent normalisation (what stock pipelines apply), recorded in the contract.
SOURCE_NORMALISATION_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
# Key prefixes of whole-model checkpoints in the original (CompVis LDM / SGM) layout.
_ORIGINAL_KEY_PREFIXES = ("first_stage_model.", "vae.")


class AutoencoderSourceError(ValueError):
    """A source spec that names no loadable AutoencoderKL."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where an autoencoder source spec points on this machine."""

    spec: str
    kind: str  # "autoencoder_folder" | "pipeline_folder" | "hub" | "single_file"
    config_file: Path  # the diffusers AutoencoderKL config.json
    weights_file: Path  # one .safetensors file
    repo_id: str | None = None
    revision: str | None = None  # the commit the Hub files were resolved to


def _is_vae_config(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("_class_name") == "AutoencoderKL"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _folder_weights(folder: Path, spec: str) -> Path:
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return folder / found[0]
    raise AutoencoderSourceError(
        f"{spec}: {folder} has no {WEIGHTS_NAME}"
        + (f" (it holds {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else "")
        + (f" (it holds several .safetensors files {found}: pass one of them as the source)" if len(found) > 1 else "")
    )


def _resolve_folder(path: Path, spec: str) -> ResolvedSource:
    if _is_vae_config(path / "config.json"):
        return ResolvedSource(spec, "autoencoder_folder", path / "config.json", _folder_weights(path, spec))
    if (path / "model_index.json").is_file():
        if not _is_vae_config(path / "vae" / "config.json"):
            raise AutoencoderSourceError(f"{spec}: the pipeline folder {path} has no vae/ with an AutoencoderKL config.json")
        return ResolvedSource(spec, "pipeline_folder", path / "vae" / "config.json", _folder_weights(path / "vae", spec))
    raise AutoencoderSourceError(
        f"{spec}: {path} is neither an AutoencoderKL folder (config.json with _class_name AutoencoderKL) nor a "
        "pipeline folder (model_index.json with a vae/ subfolder)"
    )


def _resolve_single_file(path: Path, config: Path | None, spec: str) -> ResolvedSource:
    if config is None:
        for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
            if _is_vae_config(candidate):
                config = candidate
                break
        else:
            raise AutoencoderSourceError(
                f"{spec}: a single weights file needs its diffusers AutoencoderKL config.json; pass it with "
                f"--source-config (e.g. the vae/config.json of the model it belongs to)"
            )
    config = Path(config)
    if config.is_dir():
        config = config / "config.json"
    if not _is_vae_config(config):
        raise AutoencoderSourceError(f"{spec}: {config} is not an AutoencoderKL config.json (_class_name AutoencoderKL)")
    return ResolvedSource(spec, "single_file", config, path)


def _parse_hub(spec: str) -> tuple[str, str, str | None]:
    body, _, query = spec[len("hf:"):].partition("?")
    options = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    unknown = sorted(set(options) - {"revision"})
    if unknown or (query and not options):
        raise AutoencoderSourceError(f"{spec}: the only option an hf: autoencoder source takes is ?revision=COMMIT")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise AutoencoderSourceError(f"{spec}: give hf:ORG/NAME or hf:ORG/NAME/SUBFOLDER")
    return "/".join(parts[:2]), "/".join(parts[2:]), options.get("revision")


def _resolve_hub(spec: str) -> ResolvedSource:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, sub, revision = _parse_hub(spec)
    candidates = [sub] if sub else ["", "vae"]
    for folder in candidates:
        name = f"{folder}/config.json" if folder else "config.json"
        try:
            config = Path(hf_hub_download(repo_id, name, revision=revision))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        if not _is_vae_config(config):
            continue
        weights = Path(hf_hub_download(repo_id, f"{folder}/{WEIGHTS_NAME}" if folder else WEIGHTS_NAME, revision=revision))
        # Files in the Hub cache live under snapshots/<commit>/: that commit is what was loaded.
        commit = config.parents[len(Path(name).parts) - 1].name
        return ResolvedSource(spec, "hub", config, weights, repo_id=repo_id, revision=commit)
    where = f"{sub}/config.json" if sub else "config.json or vae/config.json"
    raise AutoencoderSourceError(
        f"{spec}: no AutoencoderKL {where} found in {repo_id}. Offline (HF_HUB_OFFLINE=1), the repository must "
        "already be in the Hugging Face cache: run once with internet access, or download it and give the folder."
    )


def resolve_autoencoder_source(spec: str, config: str | Path | None = None) -> ResolvedSource:
    """Turn a source spec (module docstring) into a config file and one safetensors weights file."""
    spec = str(spec)
    if spec.startswith("hf:"):
        return _resolve_hub(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise AutoencoderSourceError(f"{spec}: no such file or folder (use hf:ORG/NAME for a Hub repository)")
    if path.is_dir():
        return _resolve_folder(path, spec)
    if path.suffix != ".safetensors":
        raise AutoencoderSourceError(
            f"{spec}: only .safetensors weights are loaded (pickle-based .ckpt/.bin/.pt files can run code); "
            "convert the file to safetensors first"
        )
    return _resolve_single_file(path, Path(config) if config else None, spec)


def _load_state_dict(vae: AutoencoderKL, weights: Path, spec: str) -> None:
    state = load_file(weights)
    own = vae.state_dict()
    expected = set(own)
    if expected - set(state) and any(k.startswith(_ORIGINAL_KEY_PREFIXES) or ".down.0." in k for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        # Original LDM / BFL key names (encoder.down.0.block.0...): diffusers' own converter.
        state = convert_ldm_vae_checkpoint(state, dict(vae.config))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise AutoencoderSourceError(
            f"{spec}: {weights.name} does not fit its config.json: {len(missing)} weights missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is the config the one "
            "of this autoencoder?"
        )
    shapes = [k for k, v in state.items() if v.shape != own[k].shape]
    if shapes:
        raise AutoencoderSourceError(f"{spec}: weight shapes differ from its config.json (e.g. {shapes[:3]})")
    vae.load_state_dict({k: v.float() for k, v in state.items()})


def load_pretrained_autoencoder(spec: str, config: str | Path | None = None) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The source autoencoder in float32, eval mode, and its JSON-ready provenance record."""
    src = resolve_autoencoder_source(spec, config)
    diffusers_config = json.loads(src.config_file.read_text(encoding="utf-8"))
    vae = AutoencoderKL.from_config(diffusers_config).float()
    _load_state_dict(vae, src.weights_file, spec)
    source = {
        "spec": spec,
        "kind": src.kind,
        "path": str(src.weights_file.resolve()),  # informational: paths differ between machines
        "repo_id": src.repo_id,
        "revision": src.revision,
        "weights_sha256": {src.weights_file.name: sha256_file(src.weights_file)},
        "config": {k: v for k, v in diffusers_config.items() if not k.startswith("_")},
        "imported_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    source.update({k: vae.config.get(k) for k in SOURCE_NORMALISATION_KEYS})
    source["scaling_factor"] = float(source["scaling_factor"]) if source["scaling_factor"] is not None else None
    return vae.eval(), source


@torch.no_grad()
def make_foldable(vae: AutoencoderKL) -> bool:
    """Give ``vae`` identity ``quant_conv``/``post_quant_conv`` where it has none (FLUX, SD3), in place.

    Folding the latent statistics needs both 1x1 convs; identity ones change no output, and the
    saved config then says ``use_quant_conv: true`` so stock diffusers rebuilds them. Returns
    whether any was added.
    """
    c = vae.config.latent_channels
    added = False
    if vae.quant_conv is None:
        vae.quant_conv = _identity_conv(2 * c).to(vae.device, vae.dtype)
        vae.register_to_config(use_quant_conv=True)
        added = True
    if vae.post_quant_conv is None:
        vae.post_quant_conv = _identity_conv(c).to(vae.device, vae.dtype)
        vae.register_to_config(use_post_quant_conv=True)
        added = True
    return added


def _identity_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.bias)
    conv.weight.copy_(torch.eye(channels)[:, :, None, None])
    return conv


def autoencoder_config_of(vae: AutoencoderKL) -> AutoencoderConfig:
    """Our shape summary of any ``AutoencoderKL`` (its full architecture stays in its config.json)."""
    cfg = vae.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    sample_size = cfg.sample_size if isinstance(cfg.sample_size, int) else int(cfg.sample_size[0])
    if sample_size % factor:  # only informs tiling; keep the contract valid
        sample_size = factor * max(1, sample_size // factor)
    return AutoencoderConfig(
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.get("mid_block_add_attention", True), in_channels=cfg.in_channels,
        sample_size=sample_size,
    )


def source_normalisation(source: dict[str, Any], latent_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) that reproduce what stock pipelines do with this autoencoder's latents.

    diffusers: ``(z - shift_factor) * scaling_factor`` (SD: no shift), or with ``latents_mean``/
    ``latents_std`` ``(z - mean) * scaling_factor / std``. So mean = shift (or latents_mean) and
    std = 1 / scaling_factor (or latents_std / scaling_factor).
    """
    scale = source.get("scaling_factor")
    if scale is None or scale <= 0:
        raise AutoencoderSourceError(f"{source['spec']}: the source config has no positive scaling_factor to reproduce")
    if source.get("latents_mean") is not None and source.get("latents_std") is not None:
        mean = [float(v) for v in source["latents_mean"]]
        std = [float(v) / scale for v in source["latents_std"]]
    else:
        shift = float(source.get("shift_factor") or 0.0)
        mean, std = [shift] * latent_channels, [1.0 / scale] * latent_channels
    if len(mean) != latent_channels or len(std) != latent_channels:
        raise AutoencoderSourceError(f"{source['spec']}: latents_mean/latents_std do not have {latent_channels} entries")
    return mean, std


def load_for_training(spec: str, config: str | Path | None = None) -> tuple[AutoencoderKL, dict[str, Any], Any]:
    """``train_vae.py --init-from``: the source (foldable, float32), its record, and its latent contract
    when SRC is a stage-1 folder (ours or imported), else None. A decoder-only run keeps that contract:
    the encoder and its folded statistics do not change, so neither do the latents."""
    from autoencoder.folder import CONTRACT_FILE, read_latent_contract

    vae, source = load_pretrained_autoencoder(spec, config)
    folder = Path(source["path"]).parent
    contract = read_latent_contract(folder) if (folder / CONTRACT_FILE).is_file() else None
    source["added_identity_quant_convs"] = make_foldable(vae)
    return vae, source, contract


def freeze_encoder(vae: AutoencoderKL) -> int:
    """Decoder-only fine-tuning (as ``sd-vae-ft-mse`` was made): the encoder and ``quant_conv`` stop
    training, so the latent space stays the source's. Returns the parameters left trainable."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    return sum(p.numel() for p in vae.parameters() if p.requires_grad)
