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


def _silence_cross_attention(unet) -> None:
    """Zero every cross-attention output projection, so no text reaches the UNet through attention."""
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def test_pooled_text_reaches_the_blocks_without_attention():
    """With pooled_text the prompt also enters the timestep embedding, so a UNet whose levels have
    no attention at all still depends on the text through its ResNet blocks (diffusers' "text"
    addition embedding, computed inside the UNet: stock pipelines need nothing extra)."""
    import dataclasses

    cfg = dataclasses.replace(UNET_PRESETS["tiny"], attention_levels=(False, False), pooled_text=True,
                              pooled_text_heads=4)
    unet = build_unet(cfg, cross_attention_dim=16)
    assert unet.config.addition_embed_type == "text" and unet.config.addition_embed_type_num_heads == 4
    _silence_cross_attention(unet)  # the mid block's too: only the pooled path can carry the text now
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    a = unet(x, t, encoder_hidden_states=torch.randn(1, 3, 16, generator=g)).sample
    b = unet(x, t, encoder_hidden_states=torch.randn(1, 3, 16, generator=g)).sample
    assert not torch.allclose(a, b)
    plain = build_unet(dataclasses.replace(cfg, pooled_text=False), cross_attention_dim=16)
    assert plain.config.addition_embed_type is None
    _silence_cross_attention(plain)
    h1, h2 = torch.randn(1, 3, 16, generator=g), torch.randn(1, 3, 16, generator=g)
    assert torch.equal(plain(x, t, encoder_hidden_states=h1).sample, plain(x, t, encoder_hidden_states=h2).sample)
    with pytest.raises(ValueError, match="does not divide the text width"):
        build_unet(dataclasses.replace(cfg, pooled_text_heads=5), cross_attention_dim=16)
