"""autoencoder.metrics: PSNR and SSIM on [-1, 1] images, per image."""

from __future__ import annotations

import math

import pytest
import torch

from autoencoder.metrics import lpips_metric_if_available, psnr, reconstruction_metrics, ssim


def test_psnr_of_a_known_error():
    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    # +0.1 in [-1, 1] is +0.05 in [0, 1]: MSE 0.0025, PSNR = 10 log10(1 / 0.0025) = 26.02 dB.
    torch.testing.assert_close(psnr(x + 0.1, x), torch.full((2,), 10 * math.log10(400.0)))
    assert torch.isinf(psnr(x, x)).all()


def test_psnr_judges_the_clamped_picture():
    x = torch.ones(1, 3, 8, 8)
    assert torch.isinf(psnr(x + 5.0, x)).all()  # everything above 1 saves as white


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    noisy = x + 0.3 * torch.randn_like(x)
    same, worse = ssim(x, x), ssim(noisy, x)
    assert same.shape == worse.shape == (3,)
    torch.testing.assert_close(same, torch.ones(3))
    assert (worse < 0.9).all()
    torch.testing.assert_close(ssim(noisy, x), ssim(x, noisy))


def test_reconstruction_metrics_are_per_image():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = reconstruction_metrics(x * 0.9, x)
    assert set(out) == {"psnr", "ssim"} and all(v.shape == (4,) for v in out.values())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        psnr(x[0], x[0])


def test_lpips_metric_is_left_out_when_its_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert lpips_metric_if_available() is None
