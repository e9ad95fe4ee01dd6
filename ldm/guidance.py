"""Classifier-free guidance as a wrapper around the denoiser call.

Ho & Salimans 2022, eq. 6, applied to the model output whatever it parameterises (epsilon or v),
on all channels, as diffusers' ``StableDiffusionPipeline`` does, so our sampling matches stock
diffusers step for step:
    out = out_uncond + w * (out_cond - out_uncond)
with the optional rescale of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps
are Flawed", §3.4, eqs. 15-16), which pulls the guided output's per-sample std back to the
conditional output's to undo the over-exposure large w causes:
    out_rescaled = out * std(out_cond) / std(out)
    out          = phi * out_rescaled + (1 - phi) * out
"""

from __future__ import annotations

import math

import torch

from ldm.objective import Denoiser


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2023 eqs. 15-16; std over every non-batch dim. guided, cond: [B, C, h, w]."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def classifier_free_guidance(
    denoiser: Denoiser,
    uncond_hidden: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> Denoiser:
    """A denoiser that runs the unconditional and conditional branches in ONE batched call.

    uncond_hidden: [B, L, D] hidden states of the negative prompt or the null embedding, one per
    sample of the batch the returned denoiser will be called with. The batch is laid out
    [uncond; cond] as in diffusers, so batched kernels see the same rows in the same order.
    """
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1 = no guidance), not {guidance_scale}")
    if not 0.0 <= guidance_rescale <= 1.0:  # also refuses nan
        raise ValueError(f"guidance_rescale must be in [0, 1], not {guidance_rescale}")

    def guided(x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if uncond_hidden.shape != hidden.shape:
            raise ValueError(
                f"unconditional hidden states {tuple(uncond_hidden.shape)} do not match the "
                f"conditional ones {tuple(hidden.shape)}"
            )
        t2 = t if t.ndim == 0 else torch.cat([t, t])  # a scalar t is broadcast by the UNet
        out = denoiser(torch.cat([x_t, x_t]), t2, torch.cat([uncond_hidden, hidden]))
        out_uncond, out_cond = out.chunk(2)  # [B, C, h, w] each
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0.0:
            out = rescale_guided(out, out_cond, guidance_rescale)
        return out

    return guided
