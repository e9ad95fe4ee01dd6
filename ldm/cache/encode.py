"""The cached tensors of one batch: the frozen encoders run once per batch, both image views together.

Per sample (Rombach et al. 2022 train the LDM on a frozen first stage, so its encodings never change
during stage 3 and need computing only once):

    latent_mean       [C, h, w]   posterior mean of the autoencoder (its latent contract is folded
    latent_std        [C, h, w]   into its weights, so these are already normalised: no scaling here)
    latent_mean_flip  [C, h, w]   the same for the horizontally flipped image, when data.flip is on:
    latent_std_flip   [C, h, w]   the encoder is not flip-equivariant, so flipped latents are encoded
    text              {caption: [L, D]}  with --cache-text, the frozen text encoder's hidden states
                                  of every distinct caption variant of the batch (a list caption has
                                  several; `data.captions.caption_variants`); the shard writer stores
                                  each distinct one once per shard

Speed: no autograd (inference mode) and the plain and flipped views in one autoencoder call. The
precision is the encoders' own: pass an `autoencoder.frozen.FrozenEncoder` (channels-last, in the
dtype `text_encoder.resolve_dtype("auto", device)` picks) and a text encoder loaded with the dtype
wanted. Both put their dtype in their fingerprints (`encode_dtype`, `dtype`), so a cache built in
bf16 and one built in fp32 have different keys and are never mixed. The text encoder itself encodes
each distinct caption of a batch once.

Images of every shape are encoded alike: a bucketed batch holds one bucket, so its latents are
[B, C, H_b / f, W_b / f].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL

from autoencoder.frozen import FrozenEncoder
from ldm.cache.spec import CacheSpec
from text_encoder import FrozenTextEncoder

ImageEncoder = AutoencoderKL | FrozenEncoder


@dataclass
class EncodedBatch:
    """One batch's cached tensors: per-sample latents, and the embedding of each distinct caption."""

    latents: dict[str, torch.Tensor]
    """latent_mean, latent_std (and *_flip): [B, C, h, w] each."""
    text: dict[str, torch.Tensor] | None
    """{caption: [L, D]} for every distinct caption variant of the batch; None without --cache-text."""


@torch.inference_mode()
def encode_batch(batch: dict[str, Any], vae: ImageEncoder, text_encoder: FrozenTextEncoder | None,
                 spec: CacheSpec) -> EncodedBatch:
    """The cached tensors of one `iterate_once` batch, on the CPU in the spec's storage dtypes."""
    pixels = batch["pixel_values"].to(vae.device, vae.dtype)  # [B, 3, H, W] in [-1, 1]
    b = pixels.shape[0]
    views = torch.cat([pixels, pixels.flip(-1)]) if spec.data.flip else pixels  # [B or 2B, 3, H, W]
    posterior = vae.encode(views).latent_dist  # DiagonalGaussianDistribution; std = exp(0.5 * logvar)
    mean, std = posterior.mean, posterior.std  # [B or 2B, C, h, w]
    out = {"latent_mean": mean[:b], "latent_std": std[:b]}
    if spec.data.flip:
        out |= {"latent_mean_flip": mean[b:], "latent_std_flip": std[b:]}
    out = {name: t.to("cpu", spec.torch_dtype("latent")).contiguous() for name, t in out.items()}
    if text_encoder is None:
        return EncodedBatch(out, None)
    captions = list(dict.fromkeys(c for variants in batch["caption_variants"] for c in variants))  # first-seen order
    hidden = text_encoder.encode(captions).hidden.to("cpu", spec.torch_dtype("text"))  # [V, L, D]
    return EncodedBatch(out, {c: hidden[i].clone() for i, c in enumerate(captions)})


@torch.inference_mode()
def encode_null_text(text_encoder: FrozenTextEncoder, spec: CacheSpec) -> torch.Tensor:
    """The unconditional embedding [1, L, D] for caption dropout, stored like the cached ones."""
    return text_encoder.null_embedding().hidden.to("cpu", spec.torch_dtype("text")).contiguous()
