"""ldm.unet: presets build the intended diffusers UNet, with SDPA attention."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ldm.unet import UNET_PRESETS, UNetConfig, build_unet, unet_denoiser


def test_tiny_unet_takes_widths_from_the_other_stages():
    unet = build_unet("tiny", cross_attention_dim=48, latent_channels=3)
    assert unet.config.cross_attention_dim == 48
    assert unet.config.in_channels == unet.config.out_channels == 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    hidden = torch.randn(2, 5, 48, generator=g)
    out = unet(x, torch.tensor([3, 900]), encoder_hidden_states=hidden).sample
    assert out.shape == x.shape
    # The Denoiser adapter is the same call.
    assert torch.equal(unet_denoiser(unet)(x, torch.tensor([3, 900]), hidden), out)


def test_attention_uses_pytorch_sdpa():
    processors = build_unet("tiny", cross_attention_dim=16).attn_processors
    assert processors, "tiny preset must contain attention layers"
    assert all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_cross_attention_really_reads_the_text():
    unet = build_unet("tiny", cross_attention_dim=16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    a = unet(x, t, encoder_hidden_states=torch.randn(1, 3, 16, generator=g)).sample
    b = unet(x, t, encoder_hidden_states=torch.randn(1, 3, 16, generator=g)).sample
    assert not torch.allclose(a, b)


def test_sd15_preset_is_stable_diffusion_15_shape():
    with torch.device("meta"):  # no memory for 860 M parameters
        unet = build_unet("sd15", cross_attention_dim=768)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's UNet
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert unet.config.attention_head_dim == 8


def test_small_preset_runs_on_demo_latents():
    unet = build_unet(UNET_PRESETS["small"], cross_attention_dim=384)
    x = torch.zeros(2, 4, 16, 16)
    out = unet(x, torch.tensor([10, 20]), encoder_hidden_states=torch.zeros(2, 16, 384)).sample
    assert out.shape == x.shape


def test_bad_configs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="one flag per level"):
        UNetConfig(block_out_channels=(32, 64), attention_levels=(True,))
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig(block_out_channels=(30, 64), norm_num_groups=32)
    with pytest.raises(ValueError, match="choose one of"):
        build_unet("huge", cross_attention_dim=16)
