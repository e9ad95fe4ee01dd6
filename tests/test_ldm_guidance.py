"""ldm.guidance: CFG as a wrapper around the denoiser, in one batched call."""

import pytest
import torch

from ldm.guidance import classifier_free_guidance, rescale_guided


class CountingDenoiser:
    """Output depends on x, t and the text; counts calls and remembers batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, hidden):
        self.batches.append(x.shape[0])
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return torch.tanh(x) + hidden.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 1e-3 * t.view(-1, 1, 1, 1)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)


@pytest.mark.parametrize("t", [torch.tensor(700), torch.tensor([700, 10, 3])])
def test_scale_one_is_the_conditional_output_in_one_batched_call(t):
    x, cond, uncond = _inputs()
    model = CountingDenoiser()
    out = classifier_free_guidance(model, uncond, guidance_scale=1.0)(x, t, cond)
    torch.testing.assert_close(out, model(x, t, cond))
    assert model.batches[0] == 6  # uncond and cond together


def test_scale_zero_is_unconditional_and_scale_w_extrapolates():
    x, cond, uncond = _inputs()
    model, t = CountingDenoiser(), torch.tensor(500)
    torch.testing.assert_close(classifier_free_guidance(model, uncond, 0.0)(x, t, cond), model(x, t, uncond))
    c, u = model(x, t, cond), model(x, t, uncond)
    torch.testing.assert_close(classifier_free_guidance(model, uncond, 7.5)(x, t, cond), u + 7.5 * (c - u))


def test_guidance_rescale_matches_the_conditional_std():
    x, cond, uncond = _inputs(1)
    model, t = CountingDenoiser(), torch.tensor(500)
    c = model(x, t, cond)
    full = classifier_free_guidance(model, uncond, 9.0, guidance_rescale=1.0)(x, t, cond)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))
    plain = classifier_free_guidance(model, uncond, 9.0)(x, t, cond)
    half = classifier_free_guidance(model, uncond, 9.0, guidance_rescale=0.5)(x, t, cond)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)
    torch.testing.assert_close(rescale_guided(plain, c, 0.0), plain)


def test_bad_arguments():
    x, cond, uncond = _inputs()
    with pytest.raises(ValueError, match="guidance_rescale"):
        classifier_free_guidance(CountingDenoiser(), uncond, 5.0, guidance_rescale=2.0)
    with pytest.raises(ValueError, match="do not match"):
        classifier_free_guidance(CountingDenoiser(), uncond[:2], 5.0)(x, torch.tensor(1), cond)
