"""autoencoder.model: presets, the builder, and the training wrapper."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig, TrainableAutoencoder, build_autoencoder
from autoencoder.model import check_config_matches, count_parameters, decoder_last_layer


def test_presets_have_the_promised_shapes():
    assert set(AUTOENCODER_PRESETS) >= {"tiny", "small", "kl-f8", "kl-f4"}
    f8 = AUTOENCODER_PRESETS["kl-f8"]
    assert (f8.block_out_channels, f8.latent_channels, f8.layers_per_block) == ((128, 256, 512, 512), 4, 2)
    assert f8.downsample_factor == 8
    assert AUTOENCODER_PRESETS["kl-f4"].downsample_factor == 4
    small = AUTOENCODER_PRESETS["small"]
    assert (small.downsample_factor, small.latent_channels, small.sample_size) == (4, 4, 64)
    assert count_parameters(build_autoencoder(AUTOENCODER_PRESETS["tiny"])) < 10_000


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_built_model_downsamples_by_the_config_factor(name):
    cfg = AUTOENCODER_PRESETS[name]
    vae = build_autoencoder(cfg)
    x = torch.zeros(1, 3, cfg.sample_size, cfg.sample_size)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    side = cfg.sample_size // cfg.downsample_factor
    assert mean.shape == (1, cfg.latent_channels, side, side)
    assert vae.config.scaling_factor == 1.0 and vae.config.shift_factor is None
    check_config_matches(vae, cfg)


def test_config_rejects_bad_values_with_clear_errors():
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        AutoencoderConfig(block_out_channels=(30, 64), norm_num_groups=32)
    with pytest.raises(ValueError, match="latent_channels"):
        AutoencoderConfig(latent_channels=0)
    with pytest.raises(ValueError, match="not divisible"):
        AutoencoderConfig(block_out_channels=(32, 32, 32), sample_size=66)
    with pytest.raises(ValueError, match="unknown fields"):
        AutoencoderConfig.from_dict({"block_out_channels": [32], "colour": 1})


def test_config_survives_a_json_round_trip():
    cfg = AUTOENCODER_PRESETS["small"]
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_check_config_matches_names_the_difference():
    vae = build_autoencoder(AUTOENCODER_PRESETS["tiny"])
    other = AutoencoderConfig(block_out_channels=(4, 4), layers_per_block=1, latent_channels=2, norm_num_groups=2,
                              mid_block_add_attention=False, sample_size=32)
    with pytest.raises(ValueError, match="latent_channels"):
        check_config_matches(vae, other)


def test_trainable_autoencoder_owns_every_generator_parameter():
    vae = build_autoencoder(AUTOENCODER_PRESETS["tiny"])
    model = TrainableAutoencoder(vae, logvar_init=0.5)
    params = {id(p) for p in model.parameters()}
    assert {id(p) for p in vae.parameters()} | {id(model.output_logvar)} == params
    assert model.output_logvar.item() == 0.5
    assert model.last_layer() is vae.decoder.conv_out.weight is decoder_last_layer(vae)
    with pytest.raises(TypeError, match="unwrap"):
        decoder_last_layer(model)


def test_forward_returns_reconstruction_and_posterior_and_is_reproducible():
    torch.manual_seed(0)
    model = TrainableAutoencoder(build_autoencoder(AUTOENCODER_PRESETS["tiny"]))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a = model(x, generator=torch.Generator().manual_seed(7))
    b = model(x, generator=torch.Generator().manual_seed(7))
    c = model(x, generator=torch.Generator().manual_seed(8))
    assert a.reconstruction.shape == x.shape
    assert a.posterior.mean.shape == (2, 4, 16, 16)
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert not torch.equal(a.reconstruction, c.reconstruction)
    mode = model(x, sample_posterior=False).reconstruction
    with torch.no_grad():
        assert torch.allclose(mode, model.vae(x).sample)
    assert isinstance(model.vae, AutoencoderKL)


def test_posterior_logvar_init_starts_the_encoder_nearly_deterministic():
    import dataclasses

    cfg = dataclasses.replace(AUTOENCODER_PRESETS["tiny"], posterior_logvar_init=-6.0)
    with torch.no_grad():
        posterior = build_autoencoder(cfg).encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist
        default = build_autoencoder(AUTOENCODER_PRESETS["tiny"]).encode(torch.zeros(1, 3, 32, 32)).latent_dist
    assert torch.equal(posterior.logvar, torch.full_like(posterior.logvar, -6.0))
    assert posterior.mean.std() > 0  # the mean half is untouched
    assert default.logvar.std() > 0
