"""ldm.conditioning: per-sample, generator-driven caption dropout (mask, then the null embedding)."""

import pytest
import torch

from ldm.conditioning import apply_dropout, drop_captions, dropout_mask


def _hidden(b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)


def test_dropped_rows_become_the_null_embedding_and_others_stay():
    hidden, null = _hidden()
    out, dropped = drop_captions(hidden, null, 0.3, torch.Generator().manual_seed(1))
    assert dropped.dtype == torch.bool and dropped.shape == (64,)
    assert 0 < dropped.sum() < 64
    assert torch.equal(out[dropped], null.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(out[~dropped], hidden[~dropped])


def test_same_generator_state_same_mask_regardless_of_embedding_source():
    """A cached copy of the embeddings (e.g. reloaded in fp32) gets the same dropout."""
    hidden, null = _hidden()
    cached = hidden.clone()
    _, m1 = drop_captions(hidden, null, 0.5, torch.Generator().manual_seed(3))
    _, m2 = drop_captions(cached, null, 0.5, torch.Generator().manual_seed(3))
    _, m3 = drop_captions(hidden, null, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_rate_and_extremes():
    hidden, null = _hidden(b=4000)
    _, m = drop_captions(hidden, null, 0.1, torch.Generator().manual_seed(0))
    assert 0.08 < m.float().mean() < 0.12
    assert not drop_captions(hidden, null, 0.0, torch.Generator().manual_seed(0))[1].any()
    assert drop_captions(hidden, null, 1.0, torch.Generator().manual_seed(0))[1].all()


def test_generator_advances_the_same_for_any_p():
    hidden, null = _hidden()
    g0, g1 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drop_captions(hidden, null, 0.0, g0)
    drop_captions(hidden, null, 0.9, g1)
    assert torch.equal(g0.get_state(), g1.get_state())


def test_mismatched_null_embedding_is_refused():
    hidden, _ = _hidden()
    with pytest.raises(ValueError, match="same text encoder"):
        drop_captions(hidden, torch.zeros(1, 7, 8), 0.1, torch.Generator())
    with pytest.raises(ValueError, match="p_uncond"):
        drop_captions(hidden, torch.zeros(1, 5, 8), 1.5, torch.Generator())


def test_mask_first_then_apply_equals_drop_captions():
    """Training draws the mask before encoding; it must be the mask drop_captions draws from the same state."""
    hidden, null = _hidden()
    out, dropped = drop_captions(hidden, null, 0.3, torch.Generator().manual_seed(7))
    mask = dropout_mask(len(hidden), 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(mask, dropped) and torch.equal(apply_dropout(hidden, null, mask), out)
    with pytest.raises(ValueError, match="dropout mask"):
        apply_dropout(hidden, null, mask[:3])
