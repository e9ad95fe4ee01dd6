"""PatchGAN discriminator (Isola et al. 2017, pix2pix; as used by Esser et al. 2021 for VQGAN).

Each output logit judges one overlapping patch of the input: with ``n_layers=3`` a logit sees a
70x70 receptive field. Differences from the taming-transformers ``NLayerDiscriminator``:

* GroupNorm instead of BatchNorm. GroupNorm has no running buffers and normalises each sample on
  its own, so the output does not depend on the batch composition, every DDP rank computes the
  same function, gradient accumulation is exact, and a checkpoint is just the parameters.
* Real and fake images go through in one concatenated batch (see ``losses.discriminator_loss``),
  which is equivalent because of the per-sample norm, and keeps DDP to one forward per backward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN discriminator (Isola et al. 2017) for the autoencoder's adversarial loss."""

    channels: int = 64
    """Width of the first layer; doubles per layer, capped at 8x."""
    n_layers: int = 3
    """Stride-2 layers; the receptive field grows with it (3 -> 70 px)."""
    norm: Literal["group", "none"] = "group"
    """Normalisation between layers: GroupNorm, or none."""
    norm_num_groups: int = 32
    """GroupNorm groups (norm='group'); channels must be a multiple of it."""
    in_channels: int = 3
    """Image channels (3: RGB)."""

    def __post_init__(self) -> None:
        if self.channels < 1 or self.n_layers < 1 or self.in_channels < 1 or self.norm_num_groups < 1:
            raise ValueError(f"DiscriminatorConfig needs channels, n_layers, in_channels and norm_num_groups >= 1, got {self}")
        if self.norm not in ("group", "none"):
            raise ValueError(f"DiscriminatorConfig.norm must be 'group' or 'none', got {self.norm!r}")
        if self.norm == "group" and self.channels % self.norm_num_groups:
            raise ValueError(
                f"DiscriminatorConfig.channels={self.channels} must be a multiple of "
                f"norm_num_groups={self.norm_num_groups} when norm='group'"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _block(cfg: DiscriminatorConfig, c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    # 4x4 convs, padding 1: the pix2pix layout. The norm makes the bias redundant.
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, stride, 1, bias=cfg.norm == "none")]
    if cfg.norm == "group":
        layers.append(nn.GroupNorm(cfg.norm_num_groups, c_out))
    layers.append(nn.LeakyReLU(0.2))
    return layers


class PatchDiscriminator(nn.Module):
    """images [B, C, H, W] in [-1, 1] -> patch logits [B, 1, H', W'] (H' = H / 2^n_layers - 2)."""

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = cfg
        widths = [cfg.channels * min(2**i, 8) for i in range(cfg.n_layers + 1)]
        # First layer has no norm (pix2pix): normalising raw pixels removes colour information.
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.n_layers):
            layers += _block(cfg, widths[i - 1], widths[i], stride=2)
        layers += _block(cfg, widths[cfg.n_layers - 1], widths[cfg.n_layers], stride=1)
        layers.append(nn.Conv2d(widths[cfg.n_layers], 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DCGAN initialisation (Radford et al. 2016): N(0, 0.02) convs, N(1, 0.02) norm scales.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def build_discriminator(cfg: DiscriminatorConfig) -> PatchDiscriminator:
    return PatchDiscriminator(cfg)
