"""The stage-3 denoiser: a diffusers ``UNet2DConditionModel`` built from a typed preset.

The network knows nothing about noise schedules: it maps (noisy latents [B, C, h, w], integer
timesteps [B], text hidden states [B, L, D]) to a prediction [B, C, h, w]; what that prediction
means (epsilon or v) is decided by ``ldm.objective``. We use the diffusers class unchanged so a
saved ``unet/`` folder loads in stock ``StableDiffusionPipeline``.

Attention runs through PyTorch's ``scaled_dot_product_attention``: diffusers' ``Attention`` picks
``AttnProcessor2_0`` by default whenever ``F.scaled_dot_product_attention`` exists
(``diffusers/models/attention_processor.py``); ``build_unet`` checks that it did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from ldm.objective import Denoiser


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the latent UNet. The text width and latent channels come from the other stages."""

    block_out_channels: tuple[int, ...] = (32, 64)
    """Channels per resolution level; each level after the first halves the spatial size."""
    attention_levels: tuple[bool, ...] = (True, True)
    """Which levels get transformer blocks (self- and cross-attention to the text); one flag per level. The mid block always has one; levels without are plain ResNet blocks."""
    layers_per_block: int = 1
    """ResNet (+ transformer) layers per level on the way down; the way up has one more."""
    num_heads: int = 4
    """Attention heads per transformer block (diffusers' misnamed ``attention_head_dim``, diffusers issue #2011: SD 1.5's 8 means 8 heads)."""
    transformer_layers_per_block: int = 1
    """Transformer layers inside each attention block."""
    use_linear_projection: bool = False
    """Linear instead of 1x1 Conv for the transformer in/out projections (SD 2.x); same maths."""
    norm_num_groups: int = 32
    """GroupNorm groups; every entry of block_out_channels must be a multiple of it."""
    sample_size: int = 16
    """Nominal latent side (only informs diffusers' default height/width); training sets it to resolution / autoencoder factor."""
    pooled_text: bool = False
    """Also add an attention-pooled summary of the text to the timestep embedding, so every ResNet block (not only the attention levels) sees the prompt: diffusers' ``addition_embed_type="text"`` (as in DeepFloyd IF), computed inside the UNet from the same hidden states, so stock ``StableDiffusionPipeline`` runs it unchanged."""
    pooled_text_heads: int = 8
    """Heads of that attention pooling (diffusers' ``addition_embed_type_num_heads``); must divide the text width."""
    scale_shift: bool = False
    """The timestep (and pooled text) embedding scales and shifts each ResNet block's normalised features (AdaGN, Dhariwal & Nichol 2021: diffusers' ``resnet_time_scale_shift="scale_shift"``) instead of being added to them."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if not self.block_out_channels or any(int(c) < 1 for c in self.block_out_channels):
            raise ValueError(f"UNetConfig: block_out_channels {self.block_out_channels} must name one or more positive widths.")
        for name in ("layers_per_block", "num_heads", "transformer_layers_per_block", "norm_num_groups", "sample_size",
                     "pooled_text_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig: {name}={getattr(self, name)} must be at least 1.")
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError(
                f"UNetConfig: attention_levels has {len(self.attention_levels)} entries but "
                f"block_out_channels has {len(self.block_out_channels)}; give one flag per level."
            )
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: block_out_channels {self.block_out_channels} must all be divisible "
                    f"by norm_num_groups={self.norm_num_groups} (GroupNorm)."
                )
            if ch % self.num_heads:
                raise ValueError(
                    f"UNetConfig: channels {ch} not divisible by num_heads={self.num_heads}."
                )

    @property
    def downsample_factor(self) -> int:
        """How much smaller the lowest level is than the latent: each level after the first halves it."""
        return 2 ** (len(self.block_out_channels) - 1)


def check_resolution(resolution: int, autoencoder_factor: int, unet: UNetConfig) -> int:
    """The latent side for square images of ``resolution`` pixels; raise if a factor does not divide it.

    The autoencoder divides the side by its factor and the UNet halves the latent once per level
    after the first; a side either does not divide trains on cropped or interpolated feature maps
    and its images cannot be sampled at the trained size. Called as soon as the autoencoder is loaded.
    """
    step = autoencoder_factor * unet.downsample_factor
    if resolution % step:
        lower, upper = resolution // step * step, (resolution // step + 1) * step
        raise ValueError(
            f"resolution {resolution} must be a multiple of {step}: the autoencoder downsamples by "
            f"{autoencoder_factor} and the UNet's {len(unet.block_out_channels)} levels by a further "
            f"{unet.downsample_factor}. Use --data.resolution {lower if lower else upper} or {upper}."
        )
    return resolution // autoencoder_factor


UNET_PRESETS: dict[str, UNetConfig] = {
    # Unit tests: ~0.2 M parameters, milliseconds per call on a CPU.
    "tiny": UNetConfig(
        block_out_channels=(16, 32),
        attention_levels=(False, True),
        layers_per_block=1,
        num_heads=2,
        norm_num_groups=8,
        sample_size=8,
    ),
    # The CPU demo: 64 px images through an f4 autoencoder -> 16x16x4 latents, minilm text (D=384).
    # Resolutions 16 -> 8 -> 4, attention only at 8x8 and 4x4 (64 and 16 tokens). Measured on the
    # 2-core demo machine (quiet, 2 threads; batch 32, L=24, forward+backward+AdamW): this 7.2 M
    # preset 0.69 s/step; (32,64,128) 4.6 M 0.45 s; (64,128) with 16x16 attention 1.10 s;
    # (96,192,192) 15.6 M 1.3 s; (64,128,256) x2 layers 25 M 1.7 s. In a 16x16 pixel-space proxy
    # run at equal compute (420 vs 640 steps, lr 1e-3, min-SNR 5) this one reached a lower loss and
    # more recognisable faces and flags than (32,64,128).
    "small": UNetConfig(
        block_out_channels=(64, 128, 128),
        attention_levels=(False, True, True),
        layers_per_block=1,
        num_heads=4,
        norm_num_groups=32,
        sample_size=16,
    ),
    # The CPU demo's stage 3 since the equal-wall-clock sweep (benchmarks/recipe_sweep.py): 4.2 M
    # parameters at 0.69x the step time of `small`, so 870 steps where `small` gets 600; recognised
    # 1.2x as often (subcategory ratio 0.293 vs 0.242, FD 12.9 vs 13.3, 3 images per prompt).
    "compact": UNetConfig(
        block_out_channels=(48, 96, 96),
        attention_levels=(False, True, True),
        layers_per_block=1,
        num_heads=4,
        norm_num_groups=16,
        sample_size=16,
    ),
    # The CPU demo's stage 3 since the second sweep (quiet AMX machine, benchmarks/recipe_sweep.py):
    # 1.2 M parameters at 0.435x the step time of `compact`, so 3,448 steps where it gets 1,500;
    # recognised 1.23x as often (subcategory ratio 0.494 vs 0.401, FD 5.26 vs 6.59, 4 images per
    # prompt) with a lower held-out loss (0.479 vs 0.492). Smaller was better at every step:
    # 7.2 M < 4.2 M < 2.0 M < 1.2 M at equal wall-clock, so at this budget steps, not capacity, limit it.
    "mini": UNetConfig(
        block_out_channels=(24, 48, 48),
        attention_levels=(False, True, True),
        layers_per_block=1,
        num_heads=4,
        norm_num_groups=8,
        sample_size=16,
    ),
    # Stable Diffusion 1.5's UNet (860 M parameters with cross_attention_dim=768).
    "sd15": UNetConfig(
        block_out_channels=(320, 640, 1280, 1280),
        attention_levels=(True, True, True, False),
        layers_per_block=2,
        num_heads=8,
        norm_num_groups=32,
        sample_size=64,
    ),
}


def unet_kwargs(cfg: UNetConfig, cross_attention_dim: int, latent_channels: int = 4) -> dict:
    """The ``UNet2DConditionModel`` constructor arguments for ``cfg`` (also stored in manifests)."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    if cfg.pooled_text and cross_attention_dim % cfg.pooled_text_heads:
        raise ValueError(
            f"UNetConfig: pooled_text_heads={cfg.pooled_text_heads} does not divide the text width "
            f"{cross_attention_dim}; pick a divisor of {cross_attention_dim}."
        )
    pooled = (dict(addition_embed_type="text", addition_embed_type_num_heads=cfg.pooled_text_heads)
              if cfg.pooled_text else {})
    return dict(
        sample_size=cfg.sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.num_heads,
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        use_linear_projection=cfg.use_linear_projection,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        **pooled,
        **({"resnet_time_scale_shift": "scale_shift"} if cfg.scale_shift else {}),
    )


def build_unet(
    cfg: UNetConfig | str, cross_attention_dim: int, latent_channels: int = 4
) -> UNet2DConditionModel:
    """A freshly initialised UNet whose cross-attention width matches the text encoder's hidden size.

    ``cfg`` is a ``UNetConfig`` or the name of a preset in ``UNET_PRESETS``.
    """
    if isinstance(cfg, str):
        if cfg not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {cfg!r}; choose one of {sorted(UNET_PRESETS)}")
        cfg = UNET_PRESETS[cfg]
    if cross_attention_dim <= 0 or latent_channels <= 0:
        raise ValueError(
            f"build_unet: cross_attention_dim ({cross_attention_dim}) and latent_channels "
            f"({latent_channels}) must be positive; take them from the text encoder and autoencoder."
        )
    unet = UNet2DConditionModel(**unet_kwargs(cfg, cross_attention_dim, latent_channels))
    _check_sdpa(unet)
    return unet


def _check_sdpa(unet: UNet2DConditionModel) -> None:
    """Fail loudly if diffusers fell back to its slow, memory-hungry matmul attention."""
    slow = sorted({type(p).__name__ for p in unet.attn_processors.values()} - {AttnProcessor2_0.__name__})
    if slow:
        raise RuntimeError(
            f"UNet attention uses {slow} instead of AttnProcessor2_0 (PyTorch SDPA); "
            "this torch build lacks torch.nn.functional.scaled_dot_product_attention."
        )



def unet_denoiser(model: torch.nn.Module) -> Denoiser:
    """Adapt a UNet2DConditionModel (bare, DDP- or accelerate-wrapped) to the ``Denoiser`` call."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return model(x_t, t, encoder_hidden_states=hidden, return_dict=False)[0]

    return denoise
