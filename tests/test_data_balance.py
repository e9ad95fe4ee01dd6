"""--data.balance-by: the latent cache stores each sample's value of a metadata field, and the cached
loader draws every value about equally often (or by a power of its size), resumably, on every rank.

Twelve images in a folder with a metadata.jsonl whose `label` is "a" for 8 of them, "b" for 3 and
"c" for 1; the random `tiny` autoencoder; no text cache.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
from ldm.cache import CacheSpec, CachedLatentLoader, build_cache, cached_loader, open_cache
from ldm.cache.loader import balance_weights

LABELS = ["a"] * 8 + ["b"] * 3 + ["c"]
VAE_FP = {"weights_sha256": "a" * 64, "config": "tiny"}


def _no_barrier() -> None:
    pass


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    import _data_fixtures as fx

    root = tmp_path_factory.mktemp("labelled")
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, label in enumerate(LABELS):
            fx.textured(i, (16, 16)).save(root / f"img{i:02d}.png")
            f.write(json.dumps({"file_name": f"img{i:02d}.png", "text": f"picture {i}", "label": label}) + "\n")
    return root


def _cfg(folder: Path, **changes) -> data.DataConfig:
    return data.DataConfig(source=str(folder), resolution=16, balance_by="label").replace(**changes)


@pytest.fixture(scope="module")
def cache(labelled, vae, tmp_path_factory):
    spec = CacheSpec(data=_cfg(labelled), cache_dir=tmp_path_factory.mktemp("cache"), vae_fingerprint=VAE_FP)
    build_cache(spec, vae=vae, text_encoder=None, rank=0, world_size=1, barrier=_no_barrier)
    return open_cache(spec.cache_dir, spec.key)


def test_weights_follow_group_sizes_and_samples_without_a_value_are_refused():
    w = balance_weights(["a", "a", "a", "a", "b"], 1.0, "label")
    assert w.tolist() == [0.25] * 4 + [1.0]  # each group's weights sum to 1
    assert balance_weights(["a", "a", "a", "a", "b"], 0.5, "label").tolist() == [0.5] * 4 + [1.0]
    assert balance_weights(["a", "a", "b"], 0.0, "label").tolist() == [1.0] * 3
    with pytest.raises(ValueError, match=r"1 of 3 samples have no 'label'.*'k2'"):
        balance_weights(["a", "b", None], 1.0, "label", keys=["k0", "k1", "k2"])


def test_the_cache_stores_each_samples_value_and_keys_the_field_but_not_the_power(cache, labelled):
    by_key = dict(zip(cache.keys, cache.balance_values))
    assert by_key == {f"img{i:02d}": label for i, label in enumerate(LABELS)}
    spec = CacheSpec(data=_cfg(labelled), cache_dir=cache.path, vae_fingerprint=VAE_FP)
    assert spec.key["data"]["balance_by"] == "label" and "balance_power" not in spec.key["data"]
    assert CacheSpec(data=_cfg(labelled, balance_power=0.5), cache_dir=cache.path,
                     vae_fingerprint=VAE_FP).key == spec.key  # another power reuses the cache
    unbalanced = CacheSpec(data=_cfg(labelled, balance_by=None), cache_dir=cache.path, vae_fingerprint=VAE_FP)
    assert "balance_by" not in unbalanced.key["data"]  # the key of caches built before the option


def _draws(loader, n_batches: int) -> list[str]:
    return [k for _ in range(n_batches) for k in next(loader)["keys"]]


def test_every_label_is_drawn_about_equally_often(cache, labelled):
    loader = cached_loader(cache, _cfg(labelled), batch_size=6, seed=0)
    label = dict(zip(cache.keys, cache.balance_values))
    counts = Counter(label[k] for k in _draws(loader, 600))  # 3,600 draws, 300 epochs of 12
    assert all(1080 <= counts[g] <= 1320 for g in "abc"), counts  # 1,200 each; unbalanced: 2,400 / 900 / 300
    sqrt = cached_loader(cache, _cfg(labelled, balance_power=0.5), batch_size=6, seed=0)
    counts = Counter(label[k] for k in _draws(sqrt, 600))
    share = {g: (LABELS.count(g) ** 0.5) / sum(n ** 0.5 for n in (8, 3, 1)) for g in "abc"}  # a 0.52, c 0.18
    assert all(abs(counts[g] / 3600 - share[g]) < 0.04 for g in "abc"), counts
    plain = cached_loader(cache, _cfg(labelled, balance_by=None), batch_size=6, seed=0)
    assert Counter(label[k] for k in _draws(plain, 2)) == Counter(LABELS)  # one epoch: a permutation


def test_balanced_resume_is_exact_and_refuses_an_unbalanced_state(cache, labelled):
    loader = cached_loader(cache, _cfg(labelled), batch_size=5, seed=3)  # batches straddle the 12-sample epochs
    _draws(loader, 7)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]
    resumed = cached_loader(cache, _cfg(labelled), batch_size=5, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [next(resumed) for _ in range(6)]):
        assert got["keys"] == want["keys"] and torch.equal(got["latent_mean"], want["latent_mean"])
    plain = cached_loader(cache, _cfg(labelled, balance_by=None), batch_size=5, seed=3)
    with pytest.raises(ValueError, match="balanced"):
        plain.load_state_dict(state)


def test_ranks_split_one_weighted_draw(cache, labelled):
    whole = CachedLatentLoader(cache, batch_size=12, seed=5, weights=balance_weights(cache.balance_values, 1.0, "label"))
    epoch = next(whole)["keys"]
    ranks = [cached_loader(cache, _cfg(labelled), batch_size=4, seed=5, rank=r, world_size=3) for r in range(3)]
    assert [k for loader in ranks for k in next(loader)["keys"]] == epoch


def test_balancing_is_refused_where_it_cannot_work(cache, labelled, tiny_autoencoder, tmp_path, capsys):
    with pytest.raises(data.DataConfigError, match="--cache-latents"):
        data.build_loader(_cfg(labelled), batch_size=2, seed=0)
    with pytest.raises(data.DataConfigError, match="one square source"):
        cached_loader(SimpleNamespace(streams=[{"source": 0}]), _cfg(labelled), batch_size=2, seed=0)
    with pytest.raises(data.DataConfigError, match="balance_power"):
        _cfg(labelled, balance_power=2.0)
    from launch.train_ldm import main as train_main

    args = ["--preset", "tiny", "--data.source", str(labelled), "--vae", str(tiny_autoencoder), "--text-encoder",
            "minilm", "--run.output-dir", str(tmp_path / "run"), "--data.balance-by", "label"]
    with pytest.raises((SystemExit, ValueError)) as refused:
        train_main(args)
    assert re.search(r"add\s+--cache-latents", capsys.readouterr().err.replace("│", " ") + str(refused.value))


def test_train_ldm_trains_balanced_from_the_cache(labelled, tiny_autoencoder, tmp_path, caplog):
    from launch.train_ldm import main as train_main

    args = ["--preset", "tiny", "--data.source", str(labelled), "--data.resolution", "16", "--vae",
            str(tiny_autoencoder), "--text-encoder", "minilm?max_length=8", "--run.output-dir", str(tmp_path / "run"),
            "--cache-latents", "--data.balance-by", "label", "--run.max-steps", "4", "--sample-every", "100"]
    with caplog.at_level("INFO"):
        train_main(args)
    assert (tmp_path / "run" / "pipeline" / "finished.json").is_file()
    assert re.search(r"balance-by label \(power 1\): 3 values of 1 to 8 samples.*largest value 33\.3% .*66\.7% "
                     r"unbalanced", caplog.text)
