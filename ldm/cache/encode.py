"""The cached tensors of one batch: the frozen encoders run once per image view and once per distinct caption.

Per sample (Rombach et al. 2022 train the LDM on a frozen first stage, so its encodings never change
during stage 3 and need computing only once):

    latent_mean       [C, h, w]   posterior mean of the autoencoder (its latent contract is folded
    latent_std        [C, h, w]   into its weights, so these are already normalised: no scaling here)
    latent_mean_flip  [C, h, w]   the same for the horizontally flipped image, when data.flip is on:
    latent_std_flip   [C, h, w]   the encoder is not flip-equivariant, so flipped latents are encoded
    text_hidden       [L, D]      the frozen text encoder's hidden states, with --cache-text

Speed: no autograd (inference mode), plain and flipped views in one autoencoder call, each distinct
caption of a batch encoded once (captions repeat: the same alt text, the empty caption), and with
`encoder_precision="bf16"` both encoders under bf16 autocast (native on AMX/AVX512-BF16 CPUs and
GPUs; the choice is part of the cache key, so caches built one way never mix with the other).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from diffusers import AutoencoderKL

from ldm.cache.spec import CacheSpec
from text_encoder import FrozenTextEncoder


def encoder_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on `device` for precision "bf16", a no-op context for "fp32"."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def distinct(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """(the distinct captions in first-seen order, index of each caption among them [B] long)."""
    position: dict[str, int] = {}
    for caption in captions:
        position.setdefault(caption, len(position))
    return list(position), torch.tensor([position[c] for c in captions], dtype=torch.long)


@torch.inference_mode()
def encode_batch(batch: dict[str, Any], vae: AutoencoderKL, text_encoder: FrozenTextEncoder | None,
                 spec: CacheSpec) -> dict[str, torch.Tensor]:
    """The cached tensors of one `iterate_once` batch, on the CPU in the spec's storage dtypes."""
    pixels = batch["pixel_values"].to(vae.device, vae.dtype)  # [B, 3, H, W] in [-1, 1]
    b = pixels.shape[0]
    views = torch.cat([pixels, pixels.flip(-1)]) if spec.data.flip else pixels  # [B or 2B, 3, H, W]
    with encoder_autocast(vae.device, spec.encoder_precision):
        posterior = vae.encode(views).latent_dist  # DiagonalGaussianDistribution; std = exp(0.5 * logvar)
    mean, std = posterior.mean, posterior.std  # [B or 2B, C, h, w]
    out = {"latent_mean": mean[:b], "latent_std": std[:b]}
    if spec.data.flip:
        out |= {"latent_mean_flip": mean[b:], "latent_std_flip": std[b:]}
    latent_dtype = spec.torch_dtype("latent")
    out = {name: t.to("cpu", latent_dtype).contiguous() for name, t in out.items()}
    if text_encoder is not None:
        unique, inverse = distinct(list(batch["captions"]))
        with encoder_autocast(text_encoder.device, spec.encoder_precision):
            hidden = text_encoder.encode(unique).hidden  # [U, L, D]
        out["text_hidden"] = hidden.to("cpu", spec.torch_dtype("text")).index_select(0, inverse).contiguous()
    return out


@torch.inference_mode()
def encode_null_text(text_encoder: FrozenTextEncoder, spec: CacheSpec) -> torch.Tensor:
    """The unconditional embedding [1, L, D] for caption dropout, made the way the cached ones are."""
    with encoder_autocast(text_encoder.device, spec.encoder_precision):
        hidden = text_encoder.null_embedding().hidden
    return hidden.to("cpu", spec.torch_dtype("text")).contiguous()
