"""Image encoders that the evaluation compares real and generated images in.

A Fréchet distance is only comparable between runs measured in the same feature space with the
same weights, so every space carries a label naming the network and the exact weights:

  inception  torchmetrics' Inception-v3 (torch-fidelity's port of the TF FID network), pool3,
             2048-d: the features ``FrechetInceptionDistance(feature=2048)`` uses, i.e. FID proper
  vae        our stage-1 encoder: the mid-block feature map averaged over space [C_mid], then the
             posterior mean (normalised latents) average-pooled to a 4x4 grid [16 * C_latent]
  openclip   an open_clip image tower: the image embedding before normalisation [embed_dim]

Every space maps uint8 images [B, 3, H, W] to float features [B, D]. Weights this machine does not
have raise ``FeatureUnavailable`` with the reason, and the evaluation skips that space. Nothing
here downloads: torch-fidelity and open_clip would try, and offline they hang in retries.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.folder import load_autoencoder
from foundation import sha256_file
from text_encoder import parse_spec

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's FID Inception weights, as torch.hub caches them; the name ends in a sha256 prefix."""
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
LATENT_GRID = 4
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Side of the grid the vae space average-pools the posterior mean to (keeps coarse layout)."""


class FeatureUnavailable(RuntimeError):
    """The weights an image encoder needs are not on this machine; the message says which and why."""


@dataclass
class FeatureSpace:
    name: str
    description: str
    dim: int
    encode: Callable[[torch.Tensor], torch.Tensor]  # uint8 [B, 3, H, W] -> float [B, dim]
    weights: dict[str, Any] = field(default_factory=dict)  # provenance: files and sha256
    notes: list[str] = field(default_factory=list)

    def label(self) -> dict[str, Any]:
        return {"description": self.description, "dim": self.dim, "weights": self.weights, "notes": self.notes}


def _check_pickle(path: Path, allow_pickle: bool, what: str) -> None:
    if path.suffix != ".safetensors" and not allow_pickle:
        raise ValueError(
            f"{what} {path} is a pickle-based file; load it only if you trust it, with "
            "--allow-pickle-weights (read with torch.load(weights_only=True)), or convert it to safetensors"
        )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8, rounded as a saved PNG would be (as diffusers' postprocess)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pil_to_uint8(images: list) -> torch.Tensor:
    """PIL images -> uint8 [B, 3, H, W]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


@torch.no_grad()
def encode_all(spaces: dict[str, FeatureSpace], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 images [B, 3, H, W] -> {space: features [B, D] on the CPU}."""
    return {name: space.encode(images).cpu() for name, space in spaces.items()}


def cat_rows(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate feature batches; [0, dim] when this process had no images."""
    return torch.cat(parts) if parts else torch.empty(0, dim)


# ---------------------------------------------------------------------------------------------
# Inception (FID proper)


def default_inception_file() -> Path:
    """Where torch-fidelity's own download would have put the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_space(weights: str, device: torch.device | str, allow_pickle: bool = False) -> FeatureSpace:
    """``weights``: "auto" (the torch.hub cache file; missing -> FeatureUnavailable) or a file."""
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception network lives there)
    except ImportError as e:
        raise FeatureUnavailable("torch-fidelity is not installed (pip install torch-fidelity)") from e
    path = default_inception_file() if weights == "auto" else Path(weights)
    if not path.is_file():
        if weights != "auto":
            raise FileNotFoundError(f"--inception-weights {path}: no such file")
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        raise FeatureUnavailable(
            f"the FID Inception weights are not on this machine (expected {path}) and cannot be downloaded "
            f"here; on a machine with internet download {URL_INCEPTION_V3} and copy it to {path}, "
            "or pass --inception-weights FILE"
        )
    sha = sha256_file(path)
    standard = sha == INCEPTION_SHA256
    if not standard and weights != "auto":  # the cache file is what torch-fidelity itself would load
        _check_pickle(path, allow_pickle, "--inception-weights")
    net = _build_inception(_read_state(path)).to(device)
    notes = [] if standard else [
        f"{path.name} is not the published FID Inception file (sha256 {sha[:12]}..., expected "
        f"{INCEPTION_SHA256[:12]}...): these FID/KID numbers "
        "are not comparable with published ones (and meaningless if the weights are random, as in tests)"
    ]  # fmt: skip
    return FeatureSpace(
        "inception", "Inception-v3 pool3 (torchmetrics / torch-fidelity FID network), 2048-d", 2048,
        lambda images: net(images.to(device)).float(),
        {"file": str(path), "sha256": sha, "published_fid_weights": standard}, notes,
    )  # fmt: skip


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_inception(state: dict[str, torch.Tensor]) -> nn.Module:
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
    from torchmetrics.image.fid import NoTrainInceptionV3

    # torch-fidelity's constructor either downloads the weights or torch.load()s a given path with
    # full unpickling; hand it the state dict read above (weights_only=True or safetensors) instead.
    with mock.patch.object(fidelity_inception, "load_state_dict_from_url", return_value=state):
        try:
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except RuntimeError as e:
            raise ValueError(f"the Inception weights do not fit torch-fidelity's FID network: {e}") from e


# ---------------------------------------------------------------------------------------------
# our own autoencoder


def vae_space(folder: Path, device: torch.device | str) -> FeatureSpace:
    """Features of the stage-1 encoder in ``folder`` (verified against its latent contract)."""
    vae, contract = load_autoencoder(folder)
    vae = vae.to(device).requires_grad_(False)
    mid_channels = vae.config.block_out_channels[-1]
    dim = mid_channels + LATENT_GRID * LATENT_GRID * vae.config.latent_channels

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device=device, dtype=vae.dtype) / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
        captured: list[torch.Tensor] = []
        hook = vae.encoder.mid_block.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            mean = vae.encode(x).latent_dist.mean  # [B, c, h, w], normalised by the latent contract
        finally:
            hook.remove()
        mid = captured[0].mean(dim=(2, 3))  # [B, C_mid]
        grid = F.adaptive_avg_pool2d(mean, LATENT_GRID).flatten(1)  # [B, 16 c]
        return torch.cat([mid, grid], dim=1).float()

    description = (
        f"stage-1 autoencoder encoder ({folder}): mid-block feature map averaged over space "
        f"[{mid_channels}] + posterior mean average-pooled to {LATENT_GRID}x{LATENT_GRID} "
        f"[{dim - mid_channels}], {dim}-d"
    )
    note = "Fréchet distance in our autoencoder's features: comparable only between evaluations with this autoencoder"
    weights = {"folder": str(folder), "sha256": contract.weights_sha256}
    return FeatureSpace("vae", description, dim, encode, weights, [note])


# ---------------------------------------------------------------------------------------------
# open_clip (CLIP score and an image-tower feature space)


@dataclass
class OpenClip:
    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> [3, S, S]
    tokenizer: Callable[[list[str]], torch.Tensor]
    spec: str
    weights: dict[str, Any]
    device: torch.device

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, embed_dim], open_clip's own preprocessing (resize, crop, normalise)."""
        from torchvision.transforms.functional import to_pil_image

        pixels = torch.stack([self.preprocess(to_pil_image(im.cpu())) for im in images])
        return self.model.encode_image(pixels.to(self.device)).float()

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()


def load_openclip(spec: str, device: torch.device | str, allow_pickle: bool = False) -> OpenClip:
    """``openclip:ARCH@TAG`` (from the Hugging Face cache only), ``openclip:ARCH@FILE`` or
    ``openclip:local-dir:FOLDER`` -- the ``--text-encoder`` syntax. A tag that is not cached
    raises FeatureUnavailable; a file or folder that does not exist is an error."""
    import open_clip

    name, weights, options = _resolve_openclip(spec, allow_pickle)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=None if name.startswith("local-dir:") else str(weights), device=device, **options
    )
    tokenizer = open_clip.get_tokenizer(name)
    provenance = {"spec": spec, "file": str(weights), "sha256": sha256_file(weights)}
    return OpenClip(model.eval().requires_grad_(False), preprocess, tokenizer, spec, provenance, torch.device(device))


def _resolve_openclip(spec: str, allow_pickle: bool) -> tuple[str, Path, dict[str, Any]]:
    """(open_clip model name, local weights file, create_model options) for a spec."""
    import open_clip

    cfg = parse_spec(spec)
    if cfg.backend != "openclip":
        raise ValueError(f"{spec!r}: expected an open_clip spec, e.g. openclip:ViT-B-32@laion2b_s34b_b79k")
    if cfg.name.startswith("hf-hub:"):
        raise ValueError(f"{spec!r}: hf-hub: is not read here; download the folder and use openclip:local-dir:DIR")
    if cfg.name.startswith("local-dir:"):
        folder = Path(cfg.name[len("local-dir:") :]).expanduser()
        weights = _weights_in_folder(folder)
        _check_pickle(weights, allow_pickle or cfg.allow_pickle, "open_clip weights")
        return f"local-dir:{folder}", weights, {}
    if open_clip.get_model_config(cfg.name) is None:
        raise ValueError(f"{spec!r}: open_clip has no model config named {cfg.name!r}")
    if not cfg.pretrained:
        raise ValueError(f"{spec!r} names no weights: add @TAG or @/path/to/weights.safetensors")
    options: dict[str, Any] = {}
    if os.sep in cfg.pretrained or Path(cfg.pretrained).suffix in WEIGHT_SUFFIXES:
        weights = Path(cfg.pretrained).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"{spec!r}: no weights file {weights}")
    else:
        tag = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
        if not tag:
            raise ValueError(f"{spec!r}: {cfg.pretrained!r} is not a pretrained tag of {cfg.name}")
        weights = _cached_tag_file(spec, tag)
        options = {"force_quick_gelu": bool(tag.get("quick_gelu", False))}
        options.update({k: tuple(tag[v]) for k, v in (("image_mean", "mean"), ("image_std", "std")) if v in tag})
    _check_pickle(weights, allow_pickle or cfg.allow_pickle, "open_clip weights")
    return cfg.name, weights, options


def _weights_in_folder(folder: Path) -> Path:
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an open_clip model folder (no open_clip_config.json)")
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt*"))
    if not files:
        raise FileNotFoundError(f"{folder} has no weights file (.safetensors, .bin, .pt, .pth)")
    return files[0]


def _cached_tag_file(spec: str, tag: dict[str, Any]) -> Path:
    """The tag's weights in the Hugging Face cache, never fetched (safetensors preferred)."""
    from huggingface_hub import try_to_load_from_cache

    if not tag.get("hf_hub"):
        raise FeatureUnavailable(f"{spec} is downloaded from a URL, not the Hub; download it and pass ARCH@FILE")
    repo, filename = os.path.split(tag["hf_hub"])
    filename = filename or "open_clip_pytorch_model.bin"
    candidates = [Path(filename).with_suffix(".safetensors").name, "open_clip_model.safetensors", filename]
    for name in dict.fromkeys(candidates):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    raise FeatureUnavailable(
        f"the weights of {spec} are not in the Hugging Face cache (Hub repo {repo}) and this machine cannot "
        "download them; fetch them once on a machine with internet, or pass openclip:ARCH@/path/to/file"
    )


def openclip_space(clip: OpenClip) -> FeatureSpace:
    dim = int(clip.model.visual.output_dim)
    description = f"open_clip image tower {clip.spec}: image embedding before normalisation, {dim}-d"
    note = f"Fréchet distance in {clip.spec} image features: comparable only with the same weights file"
    return FeatureSpace("openclip", description, dim, clip.image_embeddings, clip.weights, [note])
