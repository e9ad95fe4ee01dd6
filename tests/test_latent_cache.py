"""The stage-3 latent and text cache: equals on-the-fly encoding, refuses stale or unfinished caches,
splits work over ranks, and its loader resumes exactly.

Tiny random autoencoder (`tiny` preset, 16 px images -> 4x8x8 latents), the real `minilm` text
encoder cut to 8 tokens, ten generated PNGs with .txt captions.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import data
from ldm.cache import (
    CacheError,
    CacheSpec,
    CachedLatentLoader,
    IncompleteCacheError,
    StaleCacheError,
    build_cache,
    cache_is_valid,
    ensure_cache,
    open_cache,
    sample_latents,
)

N_IMAGES = 10
VAE_FP = {"weights_sha256": "a" * 64, "config": "tiny"}


def _no_barrier() -> None:
    pass


def _cfg(images: Path, **changes) -> data.DataConfig:
    return data.DataConfig(source=str(images), resolution=16, flip=True, crop="random").replace(**changes)


def _spec(cfg: data.DataConfig, cache_dir: Path, text_fingerprint: dict | None = None, **changes) -> CacheSpec:
    """fp32 text storage unless asked otherwise: the equality checks below compare with fp32 encodings."""
    return CacheSpec(data=cfg, cache_dir=cache_dir, vae_fingerprint=VAE_FP, text_fingerprint=text_fingerprint,
                     text_dtype="float32").replace(**changes)


def _build(spec: CacheSpec, vae, text_encoder=None, barrier=_no_barrier, rank: int = 0, world_size: int = 1) -> dict:
    return build_cache(spec, vae=vae, text_encoder=text_encoder, rank=rank, world_size=world_size, barrier=barrier)


@pytest.fixture(scope="module")
def built(tmp_path_factory, images, vae, text_encoder):
    """One cache with flips and text, built by one process in shards of 4 samples."""
    cache_dir = tmp_path_factory.mktemp("cache")
    spec = _spec(_cfg(images), cache_dir, text_encoder.fingerprint, batch_size=3, samples_per_shard=4)
    _build(spec, vae, text_encoder)
    return cache_dir, spec.key


@torch.no_grad()
def _on_the_fly(images: Path, vae, text_encoder) -> dict[str, dict[str, torch.Tensor]]:
    """key -> the same quantities computed directly, in one batch (the cache used batches of 3)."""
    batch = next(iter(data.iterate_once(_cfg(images, crop="center", flip=False), batch_size=N_IMAGES)))
    x = batch["pixel_values"]  # [N, 3, 16, 16]
    plain, mirrored = vae.encode(x).latent_dist, vae.encode(x.flip(-1)).latent_dist
    hidden = text_encoder.encode(batch["captions"]).hidden  # [N, 8, 384]
    return {key: {"mean": plain.mean[i], "std": plain.std[i], "mean_flip": mirrored.mean[i],
                  "std_flip": mirrored.std[i], "text": hidden[i], "caption": batch["captions"][i]}
            for i, key in enumerate(batch["keys"])}


def test_cache_equals_on_the_fly_encoding(built, images, vae, text_encoder):
    cache_dir, key = built
    cache = open_cache(cache_dir, key)
    reference = _on_the_fly(images, vae, text_encoder)
    assert len(cache) == N_IMAGES and sorted(cache.keys) == sorted(reference)
    assert [s["num_samples"] for s in cache.manifest["shards"]] == [4, 4, 2]
    for i, k in enumerate(cache.keys):
        plain = cache.gather(torch.tensor([i]), torch.tensor([False]), with_text=True)
        flipped = cache.gather(torch.tensor([i]), torch.tensor([True]), with_text=False)
        ref = reference[k]
        torch.testing.assert_close(plain["latent_mean"][0], ref["mean"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(plain["latent_std"][0], ref["std"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(plain["text_hidden"][0], ref["text"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(flipped["latent_mean"][0], ref["mean_flip"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(flipped["latent_std"][0], ref["std_flip"], atol=1e-5, rtol=1e-4)
        assert cache.captions[i] == ref["caption"]
    # the flipped latents are the encoder's own, not the plain latents mirrored
    assert not torch.allclose(reference[cache.keys[0]]["mean_flip"], reference[cache.keys[0]]["mean"].flip(-1))
    torch.testing.assert_close(cache.null_hidden, text_encoder.null_embedding().hidden)


def test_loader_batches_match_their_keys_and_flips(built, images, vae, text_encoder):
    cache_dir, key = built
    reference = _on_the_fly(images, vae, text_encoder)
    loader = CachedLatentLoader(open_cache(cache_dir, key), batch_size=4, seed=7)
    flips = []
    for _ in range(5):
        batch = next(loader)
        assert batch["latent_mean"].shape == (4, 4, 8, 8) and batch["text_hidden"].shape == (4, 8, 384)
        for j, k in enumerate(batch["keys"]):
            suffix = "_flip" if batch["flipped"][j] else ""
            torch.testing.assert_close(batch["latent_mean"][j], reference[k]["mean" + suffix], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch["latent_std"][j], reference[k]["std" + suffix], atol=1e-5, rtol=1e-4)
            assert batch["captions"][j] == reference[k]["caption"]
        flips += batch["flipped"].tolist()
    assert any(flips) and not all(flips)


def test_each_epoch_is_a_permutation_and_resume_is_exact(built):
    cache_dir, key = built
    cache = open_cache(cache_dir, key)
    loader = CachedLatentLoader(cache, batch_size=3, seed=1)  # batches straddle the 10-sample epochs
    keys = [k for _ in range(10) for k in next(loader)["keys"]]
    assert sorted(keys[:10]) == sorted(cache.keys) and sorted(keys[10:20]) == sorted(cache.keys)
    assert keys[:10] != keys[10:20]

    loader = CachedLatentLoader(cache, batch_size=3, seed=1)
    for _ in range(4):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    streamed = open_cache(cache_dir, key, in_memory=False)  # the per-row reading path, same batches
    resumed = CachedLatentLoader(streamed, batch_size=3, seed=1)
    resumed.load_state_dict([state])
    for want, got in zip(expected, [next(resumed) for _ in range(4)]):
        assert got["keys"] == want["keys"] and torch.equal(got["flipped"], want["flipped"])
        for name in ("latent_mean", "latent_std", "text_hidden", "original_sizes"):
            assert torch.equal(got[name], want[name]), name
    with pytest.raises(ValueError, match="seed=1"):
        CachedLatentLoader(cache, batch_size=3, seed=2).load_state_dict(state)


def test_ranks_get_disjoint_equal_shares(built):
    cache_dir, key = built
    cache = open_cache(cache_dir, key)
    loaders = [CachedLatentLoader(cache, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    shares = [[k for _ in range(3) for k in next(loader)["keys"]] for loader in loaders]  # 3 batches = one epoch + 3
    first_epoch = [s[:3] for s in shares]
    assert all(len(s) == 3 for s in first_epoch)
    assert len({k for s in first_epoch for k in s}) == 9  # disjoint; 10 // 3 = 3 each, one sits out


@pytest.mark.parametrize(("component", "change", "words"), [
    ("vae", lambda k: k["vae"].update(weights_sha256="b" * 64), ["different autoencoder", "'weights_sha256'"]),
    ("text_encoder", lambda k: k["text_encoder"].update(weights_sha256="c" * 64),
     ["different text encoder", "'weights_sha256'"]),
    ("text_encoder", lambda k: k["text_encoder"].update(max_length=77), ["different text encoder", "'max_length'"]),
    ("data", lambda k: k["data"].update(resolution=32), ["different data spec", "'resolution'"]),
    ("data", lambda k: k["data"].update(flip=False), ["different data spec", "'flip'"]),
    ("dtype", lambda k: k.update(dtype="float16"), ["different storage dtype"]),
])
def test_stale_cache_is_refused_naming_what_differs(built, component, change, words):
    cache_dir, key = built
    stale = {name: dict(part) if isinstance(part, dict) else part for name, part in key.items()}
    change(stale)
    for check in (lambda: open_cache(cache_dir, stale), lambda: cache_is_valid(cache_dir, stale)):
        with pytest.raises(StaleCacheError) as caught:
            check()
        assert caught.value.component == component
        for word in [*words, str(cache_dir), "delete the folder or pass another --cache-dir"]:
            assert word in str(caught.value)


def test_text_component_rules(built, images, text_encoder):
    cache_dir, _ = built
    # on-the-fly text encoding can use a cache that also holds text; informational fields are not compared
    assert cache_is_valid(cache_dir, _spec(_cfg(images), cache_dir).key)
    moved = {**text_encoder.fingerprint, "source": "/elsewhere/minilm"}
    assert cache_is_valid(cache_dir, _spec(_cfg(images), cache_dir, moved).key)
    # a data field that cannot change a sample (how many bad samples are tolerated) is not keyed
    assert cache_is_valid(cache_dir, _spec(_cfg(images, max_bad_fraction=0.5, crop="center"), cache_dir).key)


def test_text_cache_needed_but_absent_is_refused(tmp_path, images, vae, text_encoder):
    cfg = _cfg(images, flip=False)
    _build(_spec(cfg, tmp_path, batch_size=4), vae)
    cache = open_cache(tmp_path, _spec(cfg, tmp_path).key)
    batch = next(CachedLatentLoader(cache, batch_size=4, seed=0))
    assert "text_hidden" not in batch and not batch["flipped"].any() and len(batch["captions"]) == 4
    with pytest.raises(StaleCacheError, match="holds no text embeddings"):
        open_cache(tmp_path, _spec(cfg, tmp_path, text_encoder.fingerprint).key)


def test_interrupted_build_is_detected_and_rebuilt(tmp_path, images, vae, built):
    cfg, calls = _cfg(images), []

    def dies_before_the_manifest() -> None:
        calls.append(1)
        if len(calls) == 2:  # after every shard was written, before rank 0 writes the manifest
            raise KeyboardInterrupt

    spec = _spec(cfg, tmp_path, batch_size=3, samples_per_shard=4)
    kwargs = dict(vae=vae, text_encoder=None, rank=0, world_size=1)
    with pytest.raises(KeyboardInterrupt):
        build_cache(spec, barrier=dies_before_the_manifest, **kwargs)
    assert (tmp_path / "rank000-00000.safetensors").is_file()
    (tmp_path / "rank005-00000.safetensors").write_bytes(b"left over by an older 8-process build")
    expected = spec.key
    assert not cache_is_valid(tmp_path, expected)
    with pytest.raises(IncompleteCacheError, match="Rerun the same command"):
        open_cache(tmp_path, expected)
    cache = ensure_cache(spec, barrier=_no_barrier, **kwargs)
    assert len(cache) == N_IMAGES and not (tmp_path / "rank005-00000.safetensors").exists()
    reference = open_cache(built[0], built[1])
    i, j = cache.keys.index(reference.keys[0]), 0
    assert torch.equal(cache.gather(torch.tensor([i]), torch.tensor([True]), with_text=False)["latent_mean"],
                       reference.gather(torch.tensor([j]), torch.tensor([True]), with_text=False)["latent_mean"])


def test_damaged_shard_is_caught(tmp_path, images, vae):
    cfg = _cfg(images, flip=False)
    _build(_spec(cfg, tmp_path, batch_size=5), vae)
    shard = tmp_path / "rank000-00000.safetensors"
    payload = bytearray(shard.read_bytes())
    payload[-1] ^= 0xFF
    shard.write_bytes(bytes(payload))
    with pytest.raises(CacheError, match="rank000-00000.safetensors does not match its sha256"):
        open_cache(tmp_path, _spec(cfg, tmp_path).key)


def test_two_ranks_build_disjoint_shares_covering_everything(tmp_path, images, vae):
    """Two ranks as threads meeting at a real barrier (the code path of two processes, minus the launch)."""
    cfg, barrier, errors = _cfg(images, flip=False), threading.Barrier(2, timeout=60), []

    def rank(r: int) -> None:
        try:
            _build(_spec(cfg, tmp_path, batch_size=2), vae, barrier=barrier.wait, rank=r, world_size=2)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cache = open_cache(tmp_path, _spec(cfg, tmp_path).key)
    by_rank = [set(cache.keys[:5]), set(cache.keys[5:])]
    assert [s["name"] for s in cache.manifest["shards"]] == ["rank000-00000", "rank001-00000"]
    assert not by_rank[0] & by_rank[1] and len(by_rank[0] | by_rank[1]) == N_IMAGES == len(cache)


def test_sample_latents_uses_the_given_generator():
    mean, std = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8)
    a = sample_latents(mean, std, torch.Generator().manual_seed(5))
    b = sample_latents(mean, std, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    torch.testing.assert_close(sample_latents(mean, torch.zeros_like(std), torch.Generator()), mean)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, mean + std * eps)
