"""Reconstruction metrics on images in [-1, 1]: PSNR, SSIM and (when its weights exist) LPIPS.

Every function returns one value per image ([B]) so a loop can gather across processes and average
over the whole validation set, rather than averaging per-batch averages. Images are clamped to
[-1, 1] first: a reconstruction is judged as the picture it would be saved as.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from autoencoder.perceptual import PerceptualLoss, build_perceptual_loss, perceptual_weights_available


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    return (images.float().clamp(-1.0, 1.0) + 1.0) / 2.0


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, [B]; peak = the full [-1, 1] range.

    Identical images give +inf (MSE 0), as the definition says.
    """
    x, y = _to_unit_range(images), _to_unit_range(reference)
    mse = (x - y).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse)


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image, [B] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)."""
    x, y = _to_unit_range(images), _to_unit_range(reference)
    return structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")


def reconstruction_metrics(
    images: torch.Tensor, reference: torch.Tensor, perceptual: PerceptualLoss | None = None
) -> dict[str, torch.Tensor]:
    """{"psnr", "ssim"[, "lpips"]} -> [B] each. Pass ``build_perceptual_loss()`` for LPIPS."""
    out = {"psnr": psnr(images, reference), "ssim": ssim(images, reference)}
    if perceptual is not None:
        with torch.no_grad():
            out["lpips"] = perceptual(images.float().clamp(-1, 1), reference.float()).float()
    return out


def lpips_metric_if_available(net: str = "alex") -> PerceptualLoss | None:
    """LPIPS for evaluation (AlexNet trunk, the LPIPS paper's default metric), or None offline.

    Unlike the perceptual *loss*, which raises when asked for without weights, a metric is optional:
    validation reports PSNR/SSIM and leaves LPIPS out when the trunk weights are not on disk.
    """
    return build_perceptual_loss(net) if perceptual_weights_available(net) else None
