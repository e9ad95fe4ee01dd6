"""autoencoder.latents: the statistics accumulator and the folding identities (fp32 tolerance)."""

from __future__ import annotations

import json

import pytest
import torch

from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from autoencoder.latents import LatentContract, LatentStatistics, fold_latent_statistics

CFG = AUTOENCODER_PRESETS["tiny"]
TOL = {"rtol": 1e-4, "atol": 1e-5}


def test_statistics_match_torch_and_merge_like_an_all_reduce():
    torch.manual_seed(0)
    z = torch.randn(6, 3, 5, 5) * torch.tensor([0.5, 2.0, 7.0])[None, :, None, None] + 3.0
    whole = LatentStatistics(3)
    whole.update(z)
    flat = z.double().transpose(0, 1).flatten(1)
    torch.testing.assert_close(whole.mean(), flat.mean(1))
    torch.testing.assert_close(whole.std(), flat.std(1, unbiased=False))
    assert whole.count == 6 * 25
    # Two "ranks" each see half; summing their tensors is what accelerator.reduce(..., "sum") does.
    ranks = [LatentStatistics(3), LatentStatistics(3)]
    ranks[0].update(z[:2])
    ranks[1].update(z[2:])
    reduced = LatentStatistics.from_tensor(ranks[0].as_tensor() + ranks[1].as_tensor())
    assert reduced.as_tensor().dtype == torch.float64
    torch.testing.assert_close(reduced.as_tensor(), whole.as_tensor())
    torch.testing.assert_close(ranks[0].merge(ranks[1]).std(), whole.std())


def test_statistics_reject_wrong_shapes_and_empty_use():
    stats = LatentStatistics(4)
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean()
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        stats.update(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[3, C\]"):
        LatentStatistics.from_tensor(torch.zeros(2, 4))


def test_update_from_posterior_uses_samples_not_means():
    vae = build_autoencoder(CFG)
    posterior = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist
    a, b = LatentStatistics(4), LatentStatistics(4)
    a.update_from_posterior(posterior, torch.Generator().manual_seed(1))
    b.update(posterior.sample(torch.Generator().manual_seed(1)))
    torch.testing.assert_close(a.as_tensor(), b.as_tensor())
    means = LatentStatistics(4)
    means.update(posterior.mean)
    assert not torch.allclose(a.std(), means.std())


@pytest.fixture(scope="module")
def folded_pair():
    """(original, folded) tiny models, the input, and the statistics that were folded in."""
    torch.manual_seed(0)
    original = build_autoencoder(CFG).eval()
    folded = build_autoencoder(CFG).eval()
    folded.load_state_dict(original.state_dict())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    # Deliberately non-trivial statistics: offsets and scales far from (0, 1).
    stats = LatentStatistics.from_tensor(torch.stack([
        torch.full((4,), 100.0, dtype=torch.float64),
        100.0 * torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64),
        100.0 * (torch.tensor([0.5, -1.0, 2.0, 0.1]) ** 2 + torch.tensor([0.3, 2.0, 0.7, 4.0]) ** 2).double(),
    ]))
    contract = fold_latent_statistics(folded, stats, CFG)
    return original, folded, x, stats, contract


def test_folded_encoder_returns_normalised_mean_logvar_and_samples(folded_pair):
    original, folded, x, stats, _ = folded_pair
    m = stats.mean().float()[None, :, None, None]
    s = stats.std().float()[None, :, None, None]
    with torch.no_grad():
        old, new = original.encode(x).latent_dist, folded.encode(x).latent_dist
        torch.testing.assert_close(new.mean, (old.mean - m) / s, **TOL)
        torch.testing.assert_close(new.logvar, old.logvar - 2 * s.log(), **TOL)
        old_z = old.sample(torch.Generator().manual_seed(5))
        new_z = new.sample(torch.Generator().manual_seed(5))
        torch.testing.assert_close(new_z, (old_z - m) / s, **TOL)


def test_folded_decoder_undoes_the_normalisation(folded_pair):
    original, folded, x, _, _ = folded_pair
    with torch.no_grad():
        old_z = original.encode(x).latent_dist.sample(torch.Generator().manual_seed(5))
        new_z = folded.encode(x).latent_dist.sample(torch.Generator().manual_seed(5))
        torch.testing.assert_close(folded.decode(new_z).sample, original.decode(old_z).sample, **TOL)
        # What a stock diffusers pipeline does: latents / scaling_factor (+ no shift) -> decode.
        assert folded.config.scaling_factor == 1.0 and folded.config.shift_factor is None
        assert folded.config.latents_mean is None and folded.config.latents_std is None
        torch.testing.assert_close(folded(x).sample, original(x).sample, **TOL)


def test_statistics_measured_after_folding_are_zero_mean_unit_std():
    torch.manual_seed(0)
    vae = build_autoencoder(CFG).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1

    def measure() -> LatentStatistics:
        stats = LatentStatistics(4)
        with torch.no_grad():
            stats.update_from_posterior(vae.encode(x).latent_dist, torch.Generator().manual_seed(9))
        return stats

    contract = fold_latent_statistics(vae, measure(), CFG)
    after = measure()
    torch.testing.assert_close(after.mean(), torch.zeros(4, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(after.std(), torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0)
    assert contract.folded and contract.num_values == 4 * 16 * 16


def test_contract_json_round_trip_and_validation(folded_pair):
    contract = folded_pair[4]
    data = json.loads(json.dumps(contract.to_json_dict()))
    assert (data["downsample_factor"], data["latent_channels"], data["folded"]) == (2, 4, True)
    assert LatentContract.from_json_dict(data) == contract
    with pytest.raises(ValueError, match="downsample_factor=8"):
        LatentContract.from_json_dict({**data, "downsample_factor": 8})
    with pytest.raises(ValueError, match="std >="):
        LatentContract(latent_mean=(0.0,) * 4, latent_std=(1.0, 1.0, 0.0, 1.0), folded=True,
                       autoencoder_config=CFG, num_values=10)
    with pytest.raises(ValueError, match="4 latent channels"):
        LatentContract(latent_mean=(0.0,) * 3, latent_std=(1.0,) * 3, folded=True, autoencoder_config=CFG, num_values=10)
