"""The frozen encoder stage 3 encodes with: AutoencoderKL.encode's posterior, any precision, no autograd."""

from __future__ import annotations

import pytest
import torch

from autoencoder.frozen import FrozenEncoder


def test_fp32_posterior_equals_autoencoderkl_encode(vae) -> None:
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    frozen = FrozenEncoder(vae, channels_last=False)
    ours = frozen.encode(x).latent_dist
    with torch.no_grad():
        stock = vae.encode(x).latent_dist
    assert torch.equal(ours.mean, stock.mean) and torch.equal(ours.std, stock.std)
    fast = FrozenEncoder(vae).encode(x).latent_dist  # channels-last: the same up to float32 rounding
    torch.testing.assert_close(fast.mean, stock.mean, rtol=1e-5, atol=1e-5)
    assert fast.parameters.is_contiguous()  # moments [B, 2C, h, w] back in the usual layout
    a = ours.sample(torch.Generator().manual_seed(2))
    b = stock.sample(torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not a.is_inference()  # a UNet's autograd graph may save it
    conv = torch.nn.Conv2d(a.shape[1], 1, 1)
    conv(ours.mean).sum().backward()  # an inference tensor here would raise
    assert conv.weight.grad is not None


def test_bf16_copy_leaves_the_autoencoder_alone_and_keys_its_precision(vae) -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    frozen = FrozenEncoder(vae, dtype=torch.bfloat16)
    post = frozen.encode(x).latent_dist
    assert frozen.dtype == torch.bfloat16 and post.mean.dtype == torch.float32  # float32 out
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean
    err = (post.mean - ref).abs().max().item()
    assert 0 < err < 0.1 * ref.abs().max().item()  # rounded, not another function
    base = {"weights_sha256": "abc"}
    assert frozen.fingerprint(base) == {"weights_sha256": "abc", "encode_dtype": "bfloat16"}
    assert FrozenEncoder(vae).fingerprint(base) != frozen.fingerprint(base)
    frozen.encoder.train()
    with pytest.raises(RuntimeError, match="training mode"):
        frozen.encode(x)
