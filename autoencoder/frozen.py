"""The autoencoder's encoder as stage 3 uses it: frozen, without autograd, in a chosen precision.

Stage 3 only ever encodes with the trained autoencoder (to train on latents, or to build a latent
cache), so ``FrozenEncoder`` keeps a copy of the encoder half alone (``encoder`` + ``quant_conv``) in
``dtype``, runs it under ``torch.inference_mode``, and hands back the posterior in float32::

    frozen = FrozenEncoder(vae, dtype=torch.bfloat16)   # the caller picks the dtype, e.g. with
                                                        # text_encoder.resolve_dtype("auto", device)
    posterior = frozen.encode(pixels).latent_dist       # like vae.encode(pixels).latent_dist
    latents = posterior.sample(generator)               # [B, C, h, w] float32, ordinary tensors

The posterior is built in float32 from the encoder's moments, exactly as ``AutoencoderKL.encode``
builds it (``DiagonalGaussianDistribution``). The copy runs in channels-last memory format by default:
oneDNN's convolutions then took 232 instead of 321 ms (median CPU time, one thread) for 32 images of
64 px through the ``small`` preset's encoder, and the moments differ from ``vae.encode``'s by float32
rounding (max 3e-6 there); ``channels_last=False`` in float32 is bitwise ``vae.encode``. bf16 changes
the moments' rounding more (``benchmarks/text_encode.py`` prints by how much). The precision changes the latents, so it belongs in whatever key
identifies them: ``fingerprint`` adds it to the autoencoder's own fingerprint (a latent cache built
in bf16 is then never read by an fp32 run, nor the other way round). The source ``AutoencoderKL`` is
left as it is (its decoder keeps serving pictures and evaluation in its own precision).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput


class FrozenEncoder:
    """A frozen copy of ``vae``'s encoder half on ``device`` in ``dtype`` (not an ``nn.Module``, so no
    parent's ``.train()``, ``.parameters()`` or ``state_dict()`` can reach it)."""

    def __init__(self, vae: AutoencoderKL, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, channels_last: bool = True) -> None:
        if getattr(vae, "use_tiling", False):
            raise ValueError("FrozenEncoder does not tile; call vae.disable_tiling() first (stage 3 encodes "
                             "training-size images)")
        device = device if device is not None else vae.device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.encoder = self._frozen_copy(vae.encoder, device, dtype)
        quant = getattr(vae, "quant_conv", None)
        self.quant_conv = None if quant is None else self._frozen_copy(quant, device, dtype)

    def _frozen_copy(self, module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
        module = copy.deepcopy(module).to(device=device, dtype=dtype, memory_format=self.memory_format)
        return module.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def encode(self, pixels: torch.Tensor) -> AutoencoderKLOutput:
        """Posterior of ``pixels`` [B, 3, H, W] in [-1, 1] (any dtype/device), float32, on ``self.device``."""
        if self.encoder.training or (self.quant_conv is not None and self.quant_conv.training):
            raise RuntimeError("the frozen encoder was put in training mode; call .encoder.eval()")
        x = pixels.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        with torch.inference_mode():
            moments = self.encoder(x)  # [B, 2C, h, w]
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
        # Out of inference mode, so the posterior's tensors are ordinary ones autograd may save.
        moments = moments.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # [B, 2C, h, w]
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))

    def fingerprint(self, autoencoder_fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        """``autoencoder_fingerprint`` (e.g. ``LatentContract.to_json_dict()``) plus the encoding dtype."""
        return {**autoencoder_fingerprint, "encode_dtype": str(self.dtype).removeprefix("torch.")}

    def __repr__(self) -> str:
        return f"FrozenEncoder({self.dtype}, {self.device})"
