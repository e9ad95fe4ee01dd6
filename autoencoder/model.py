"""The stage-1 network: a diffusers ``AutoencoderKL`` built from a typed config, plus its training view.

The network itself is stock diffusers, so the saved folder loads in any diffusers pipeline. Two
things are ours:

* ``AutoencoderConfig`` and its named presets (nanoGPT/DiT style registry).
* ``TrainableAutoencoder``: the module the training loop wraps with accelerate. Its ``forward``
  returns the reconstruction *and* the posterior (``AutoencoderKL.forward`` returns only the
  reconstruction, and calling ``encode``/``decode`` on the unwrapped model would bypass DDP's
  gradient sync). It also owns the learnable output log-variance of the NLL reconstruction term
  (Rombach et al. 2022, LDM ``LPIPSWithDiscriminator``), so ``TrainableAutoencoder.parameters()`` is
  exactly what the generator optimizer needs and DDP syncs the log-variance with the network.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of a KL autoencoder (diffusers ``AutoencoderKL``).

    The downsampling factor is ``2 ** (len(block_out_channels) - 1)``: every block but the last
    halves the resolution. Add or remove a block to change it.
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    """Channels per encoder/decoder block; every block but the last halves the resolution (factor 2^(n-1))."""
    layers_per_block: int = 2
    """ResNet layers per encoder block (the decoder has one more)."""
    latent_channels: int = 4
    """Channels of the latent the UNet of stage 3 works on."""
    norm_num_groups: int = 32
    """GroupNorm groups; every entry of block_out_channels must be a multiple of it."""
    mid_block_add_attention: bool = True
    """Self-attention in the encoder's and decoder's mid block (at the latent resolution)."""
    in_channels: int = 3
    """Image channels (3: RGB)."""
    sample_size: int = 256
    """Training resolution; diffusers uses it only to pick tile sizes for tiled encode/decode."""
    posterior_logvar_init: float | None = None
    """None: diffusers' initialisation (posterior noise std ~0.9 swamps the means' spread ~0.2). A number v starts the encoder nearly deterministic: logvar = v (std = exp(v / 2)); short runs need it."""

    def __post_init__(self) -> None:
        # Tuples survive a JSON round trip as lists; store them as tuples so configs compare equal.
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("AutoencoderConfig.block_out_channels must name at least one block")
        bad = [c for c in self.block_out_channels if c <= 0 or c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"AutoencoderConfig: every entry of block_out_channels must be a positive multiple of "
                f"norm_num_groups={self.norm_num_groups} (GroupNorm), got {self.block_out_channels}"
            )
        for name in ("layers_per_block", "latent_channels", "in_channels", "sample_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoencoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.posterior_logvar_init is not None and not math.isfinite(self.posterior_logvar_init):
            raise ValueError(f"AutoencoderConfig.posterior_logvar_init must be a finite number or None, got {self.posterior_logvar_init}")
        if self.sample_size % self.downsample_factor:
            raise ValueError(
                f"AutoencoderConfig.sample_size={self.sample_size} is not divisible by the downsampling "
                f"factor {self.downsample_factor}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AutoencoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"AutoencoderConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # Unit tests: ~4k parameters, f=2 (32 px -> 16 px latents).
    "tiny": AutoencoderConfig(
        block_out_channels=(4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2,
        mid_block_add_attention=False, sample_size=32,
    ),
    # CPU demo at 64 px, f=4 (64 -> 16), 0.92M parameters, ~5 GFLOP per image per training step.
    # In a fixed CPU budget, steps beat width: (32, 64, 128) learned no faster per step and costs
    # 1.5x per image; 8 GroupNorm groups beat 32 (at 32 channels, 32 groups is InstanceNorm, which
    # strips every channel's mean colour). Mid-block attention costs time and nothing shows it
    # helps in minutes. Numbers: benchmarks/vae_presets.py and benchmarks/vae_quality.py docstrings.
    "small": AutoencoderConfig(
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        mid_block_add_attention=False, sample_size=64, posterior_logvar_init=-6.0,
    ),
    # Stable Diffusion's autoencoder (LDM kl-f8: ch=128, ch_mult=(1,2,4,4), z=4, 2 res blocks).
    "kl-f8": AutoencoderConfig(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
    ),
    # LDM's kl-f4 (ch_mult=(1,2,4), z=3): f=4, 3 latent channels as in the LDM model zoo.
    "kl-f4": AutoencoderConfig(
        block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3, sample_size=256,
    ),
}


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` with ``scaling_factor=1.0``.

    The latent normalisation is folded into the weights later (``fold_latent_statistics``), so
    ``scaling_factor`` stays 1.0 and ``shift_factor``/``latents_mean``/``latents_std`` stay unset:
    stock pipelines then apply no second normalisation.
    """
    n = len(cfg.block_out_channels)
    vae = AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        mid_block_add_attention=cfg.mid_block_add_attention,
        scaling_factor=1.0,
        shift_factor=None,
        use_quant_conv=True,
        use_post_quant_conv=True,
    )
    if cfg.posterior_logvar_init is not None:
        with torch.no_grad():
            # quant_conv's output rows [C:2C] are the posterior log-variance (DiagonalGaussianDistribution).
            vae.quant_conv.weight[cfg.latent_channels :].zero_()
            vae.quant_conv.bias[cfg.latent_channels :].fill_(cfg.posterior_logvar_init)
    return vae


def decoder_last_layer(vae: AutoencoderKL) -> nn.Parameter:
    """The weight the adaptive GAN weight is measured at: the decoder's output conv.

    Esser et al. 2021 (taming-transformers, eq. 7) balance the GAN term by the ratio of gradient
    norms of the reconstruction and GAN losses at the generator's last layer.
    """
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(
            f"decoder_last_layer needs the unwrapped AutoencoderKL, got {type(vae).__name__}; "
            "use accelerator.unwrap_model(model).vae"
        )
    return vae.decoder.conv_out.weight


class AutoencoderOutput(NamedTuple):
    reconstruction: torch.Tensor  # [B, C, H, W], same range as the input ([-1, 1])
    posterior: DiagonalGaussianDistribution  # mean/logvar [B, z, H/f, W/f]
    output_logvar: torch.Tensor  # [] learnable log-variance of the reconstruction NLL


class TrainableAutoencoder(nn.Module):
    """``AutoencoderKL`` + the learnable output log-variance, as one module for DDP and the optimizer.

    ``parameters()`` = every generator parameter (network and log-variance). Save ``.vae``.
    """

    def __init__(self, vae: AutoencoderKL, logvar_init: float = 0.0) -> None:
        super().__init__()
        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"TrainableAutoencoder wraps a diffusers AutoencoderKL, got {type(vae).__name__}")
        self.vae = vae
        # A scalar log sigma^2 of a Laplace/Gaussian output model: loss = rec/exp(logvar) + logvar.
        self.output_logvar = nn.Parameter(torch.tensor(float(logvar_init)))

    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
    ) -> AutoencoderOutput:
        """pixel_values [B, C, H, W] in [-1, 1] -> reconstruction, posterior, output log-variance."""
        posterior = self.vae.encode(pixel_values).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        reconstruction = self.vae.decode(z).sample
        return AutoencoderOutput(reconstruction, posterior, self.output_logvar)

    def last_layer(self) -> nn.Parameter:
        return decoder_last_layer(self.vae)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_config_matches(vae: AutoencoderKL, cfg: AutoencoderConfig) -> None:
    """Raise if ``vae`` was not built from ``cfg`` (compares the shape-defining fields)."""
    fields = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
              "mid_block_add_attention", "in_channels")
    got = {name: vae.config[name] for name in fields}
    got["block_out_channels"] = tuple(got["block_out_channels"])
    want = {name: getattr(cfg, name) for name in fields}
    if got != want:
        diff = {k: (got[k], want[k]) for k in fields if got[k] != want[k]}
        raise ValueError(f"the autoencoder does not match its AutoencoderConfig: (model, config) differ in {diff}")
