"""autoencoder.losses / discriminator / perceptual: gradient hygiene, the NLL, the adaptive weight."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from autoencoder import AUTOENCODER_PRESETS, TrainableAutoencoder, build_autoencoder
from autoencoder.discriminator import DiscriminatorConfig, build_discriminator
from autoencoder.losses import (
    AUTOENCODER_LOSS_PRESETS,
    AutoencoderLoss,
    adaptive_adversarial_weight,
    hinge_discriminator_loss,
)
from autoencoder.perceptual import PerceptualWeightsMissing, build_perceptual_loss, trunk_weights_file

GAN_FROM_STEP_2 = dataclasses.replace(AUTOENCODER_LOSS_PRESETS["tiny"], discriminator_start_step=2)


@pytest.fixture(scope="module")
def random_lpips():
    # Random SqueezeNet trunk (the smallest lpips offers), real linear layers: gradients only.
    return build_perceptual_loss("squeeze", backbone="random")


def setup(seed: int = 0, loss_cfg=GAN_FROM_STEP_2):
    torch.manual_seed(seed)
    model = TrainableAutoencoder(build_autoencoder(AUTOENCODER_PRESETS["tiny"]))
    disc = build_discriminator(loss_cfg.discriminator)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    return model, disc, AutoencoderLoss(loss_cfg), x


def generator_step(model, disc, loss_fn, x, step):
    out = model(x, generator=torch.Generator().manual_seed(0))
    return loss_fn.generator_loss(x, out.reconstruction, out.posterior, out.output_logvar, step,
                                  last_layer_weight=model.last_layer(), discriminator=disc)


def test_generator_step_leaves_no_gradient_in_the_discriminator():
    model, disc, loss_fn, x = setup()
    loss, logs = generator_step(model, disc, loss_fn, x, step=2)
    loss.backward()
    assert logs["adaptive_weight"] > 0 and logs["adversarial"] != 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters()), "requires_grad flags must be restored"
    assert model.last_layer().grad.abs().sum() > 0


def test_discriminator_step_sends_no_gradient_to_the_autoencoder():
    model, disc, loss_fn, x = setup()
    out = model(x)
    loss, logs = loss_fn.discriminator_loss(x, out.reconstruction, 2, disc)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in disc.parameters())
    # (the last bias may get exactly 0: with every hinge active, a shift of all logits cancels)
    assert all(p.grad.abs().sum() > 0 for name, p in disc.named_parameters() if name.endswith("weight"))
    assert set(logs) == {"discriminator_loss", "logits_real", "logits_fake"}


def test_output_logvar_gets_gradient_and_changes_after_an_optimizer_step():
    model, disc, loss_fn, x = setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.output_logvar.item()
    loss, _ = generator_step(model, disc, loss_fn, x, step=0)
    loss.backward()
    assert model.output_logvar.grad is not None and model.output_logvar.grad != 0
    opt.step()
    assert model.output_logvar.item() != before


def test_nll_and_kl_follow_the_formula_before_the_gan_starts():
    model, disc, loss_fn, x = setup()
    with torch.no_grad():
        model.output_logvar.fill_(0.7)
    out = model(x)
    # A discriminator that must not be called before its start step.
    loss, logs = loss_fn.generator_loss(x, out.reconstruction, out.posterior, out.output_logvar, 1,
                                        model.last_layer(), discriminator=nn.Identity().requires_grad_())
    l1 = (x - out.reconstruction).abs()
    nll = (l1 / torch.exp(torch.tensor(0.7)) + 0.7).sum(dim=(1, 2, 3)).mean()
    kl = out.posterior.kl().mean()
    torch.testing.assert_close(loss, nll + 1e-6 * kl)
    torch.testing.assert_close(logs["nll"], nll.detach())
    assert logs["adversarial"] == 0 and logs["adaptive_weight"] == 0


def test_logs_are_detached_scalars_with_the_same_keys_at_every_step():
    model, disc, loss_fn, x = setup()
    _, before = generator_step(model, disc, loss_fn, x, step=0)
    _, after = generator_step(model, disc, loss_fn, x, step=5)
    assert set(before) == set(after)
    assert all(v.ndim == 0 and not v.requires_grad for v in after.values())


def test_gan_needs_discriminator_and_last_layer_once_on():
    model, _, loss_fn, x = setup()
    out = model(x)
    with pytest.raises(ValueError, match="discriminator="):
        loss_fn.generator_loss(x, out.reconstruction, out.posterior, out.output_logvar, 2)
    with pytest.raises(ValueError, match="discriminator_active"):
        loss_fn.discriminator_loss(x, out.reconstruction, 1, build_discriminator(GAN_FROM_STEP_2.discriminator))
    assert not AutoencoderLoss(AUTOENCODER_LOSS_PRESETS["small"]).discriminator_active(10**9)


def test_adaptive_weight_is_the_gradient_norm_ratio_clamped_and_detached():
    w = torch.randn(4, requires_grad=True)
    nll = (w * torch.arange(4.0)).sum()
    assert torch.isclose(adaptive_adversarial_weight(nll, 2 * nll, w, 1e4), torch.tensor(0.5), rtol=1e-4)
    weight = adaptive_adversarial_weight(nll, 1e-6 * nll, w, max_weight=10.0)
    assert weight == 10.0 and not weight.requires_grad


def test_hinge_loss():
    ones = torch.ones(3)
    assert hinge_discriminator_loss(ones, -ones) == 0  # both sides past the margin
    torch.testing.assert_close(hinge_discriminator_loss(0 * ones, 0 * ones), torch.tensor(1.0))


def test_patch_discriminator_output_shape():
    disc = build_discriminator(DiscriminatorConfig(channels=8, n_layers=2, norm_num_groups=4))
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 32 // 4 - 2, 32 // 4 - 2)
    with pytest.raises(ValueError, match="norm_num_groups"):
        DiscriminatorConfig(channels=12, norm_num_groups=8)


def test_perceptual_term_contributes_gradient(random_lpips):
    cfg = dataclasses.replace(AUTOENCODER_LOSS_PRESETS["tiny"], perceptual_weight=1.0, perceptual_net="squeeze")
    with_p, without_p = AutoencoderLoss(cfg, perceptual=random_lpips), AutoencoderLoss(AUTOENCODER_LOSS_PRESETS["tiny"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    posterior = build_autoencoder(AUTOENCODER_PRESETS["tiny"]).encode(x).latent_dist
    grads = []
    for loss_fn in (with_p, without_p):
        loss, logs = loss_fn.generator_loss(x, recon, posterior, torch.tensor(0.0), 0)
        grads.append(torch.autograd.grad(loss, recon)[0])
    assert logs["perceptual"] == 0
    assert (grads[0] - grads[1]).abs().sum() > 0
    assert not any(p.requires_grad for p in random_lpips.parameters())


def test_perceptual_loss_stays_in_eval_mode(random_lpips):
    cfg = dataclasses.replace(AUTOENCODER_LOSS_PRESETS["tiny"], perceptual_weight=1.0)
    AutoencoderLoss(cfg, perceptual=random_lpips).train()
    assert not any(m.training for m in random_lpips.modules())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(random_lpips(x, x), torch.zeros(2))
    assert torch.equal(random_lpips(x, x.flip(-1)), random_lpips(x, x.flip(-1)))  # no dropout


def test_missing_trunk_weights_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PerceptualWeightsMissing, match="perceptual_weight=0"):
        AutoencoderLoss(dataclasses.replace(AUTOENCODER_LOSS_PRESETS["tiny"], perceptual_weight=1.0))
    assert str(trunk_weights_file("vgg")).startswith(str(tmp_path))


def test_trunk_weights_are_loaded_from_torchvisions_cache(tmp_path, monkeypatch):
    from torchvision.models import squeezenet1_1

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path: Path = trunk_weights_file("squeeze")
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    features = {k: v for k, v in squeezenet1_1().state_dict().items() if k.startswith("features.")}
    torch.save(features, path)
    trunk = build_perceptual_loss("squeeze").lpips.net.state_dict()
    assert len(trunk) == len(features)
    for name, value in trunk.items():  # lpips keeps torchvision's indices: slice2.3.x == features.3.x
        assert torch.equal(value, features["features." + name.split(".", 1)[1]]), name
