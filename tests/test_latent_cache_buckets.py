"""The latent cache over bucketed, mixed data with list captions: cached batches are the uncached
ones (same samples, buckets, sources, flips and caption picks, latents equal to encoding the uncached
pixels), the key holds the buckets and sources, resume is exact, and the shards keep one shape each.

Fixtures: two image folders of mixed shapes (portrait, landscape, panorama, square, tiny), source
"a" with list captions in metadata.jsonl (a repeated entry among them), source "b" with .txt
captions, weights 3:1, buckets 64x64 / 128x64 / 64x128 at 64 px (the random tiny autoencoder, f2).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

import _data_fixtures as fx
import data
from data.captions import resolve_caption
from data.sample import sample_draws
from ldm.cache import (CachedLatentLoader, CachedPlannedLoader, CacheSpec, StaleCacheError, cache_is_valid,
                       cached_loader, ensure_cache, open_cache)

BUCKETS = ("64x64", "128x64", "64x128")
COUNTS = {"portrait": 3, "landscape": 3, "panorama": 2, "square": 2, "tiny": 2}
VAE_FP = {"weights_sha256": "tiny-seed-0"}


def list_captions(i: int, kind: str) -> list[str]:
    """Three entries, two of them equal: three choices, two distinct embeddings."""
    return [f"a {kind} picture {i}", f"alt text {i}", f"a {kind} picture {i}"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("buckets_mix")
    fx.make_mixed_shape_folder(root / "a", COUNTS)
    rows = []
    for path in sorted((root / "a").glob("*.txt")):
        kind, i = path.stem.rstrip("0123456789"), int(path.stem[-3:])
        rows.append({"file_name": f"{path.stem}.png", "text": list_captions(i, kind)})
        path.unlink()
    (root / "a" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    fx.make_mixed_shape_folder(root / "b", {"landscape": 2, "portrait": 2, "square": 2})
    return str(root / "a"), str(root / "b")


def mixed_cfg(sources: tuple[str, str], weights: tuple[int, int] = (3, 1), **changes) -> data.DataConfig:
    a, b = sources
    return data.DataConfig(sources=(f"{a}#weight={weights[0]}", f"{b}#weight={weights[1]}"), buckets=BUCKETS,
                           resolution=64, crop="center", flip=True, **changes)


def spec_for(cfg: data.DataConfig, cache_dir: Path, text_encoder=None, **changes) -> CacheSpec:
    return CacheSpec(data=cfg, cache_dir=cache_dir, vae_fingerprint=VAE_FP, batch_size=3, samples_per_shard=4,
                     text_fingerprint=None if text_encoder is None else text_encoder.fingerprint, **changes)


def build(spec: CacheSpec, vae, text_encoder=None):
    return ensure_cache(spec, vae=vae, text_encoder=text_encoder, rank=0, world_size=1, barrier=lambda: None)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, sources, vae, text_encoder):
    cfg = mixed_cfg(sources)
    spec = spec_for(cfg, tmp_path_factory.mktemp("cache"), text_encoder)
    return cfg, spec, build(spec, vae, text_encoder)


def test_shards_hold_one_bucket_each_and_every_distinct_caption_once(cached):
    cfg, spec, cache = cached
    assert len(cache) == sum(COUNTS.values()) + 6
    for shard in cache.manifest["shards"]:
        index = json.loads((spec.cache_dir / f"{shard['name']}.json").read_text())
        assert len({tuple(b) for b in index["buckets"]}) == 1 and len(set(index["sources"])) >= 1
        distinct = {c for variants in index["caption_variants"] for c in variants}
        assert shard["num_texts"] == len(distinct)  # deduplicated per shard
        w, h = index["buckets"][0]
        assert shard["latent_shape"] == [4, h // 2, w // 2]
    a_rows = [i for i, s in enumerate(cache.sources) if s == 0]
    assert all(len(cache.caption_variants[i]) == 3 and len(set(cache.text_rows[i])) == 2 for i in a_rows)
    assert {b for b in cache.buckets} == {(64, 64), (128, 64), (64, 128)}


def test_cached_batches_are_the_uncached_batches(cached, vae, text_encoder):
    cfg, spec, cache = cached
    loader = cached_loader(cache, cfg, batch_size=2, seed=3)
    assert isinstance(loader, CachedPlannedLoader)
    uncached = data.build_loader(cfg, batch_size=2, seed=3)  # num_workers=0: one lane, as the cached loader
    assert loader.counts == uncached.counts and loader.bucket_histogram == uncached.bucket_histogram
    epoch = sum(loader.counts)
    seen = collections.defaultdict(set)
    for step in range(3 * epoch):
        mine, theirs = next(loader), next(uncached)
        assert mine["keys"] == theirs["keys"] and mine["captions"] == theirs["captions"], step
        assert torch.equal(mine["original_sizes"], theirs["original_sizes"])
        assert torch.equal(mine["crop_top_left"], theirs["crop_top_left"])
        h, w = theirs["pixel_values"].shape[-2:]
        assert mine["latent_mean"].shape == (2, 4, h // 2, w // 2)
        if step < 6:  # the latents are the uncached pixels' (flips included), the text their captions'
            with torch.no_grad():
                posterior = vae.encode(theirs["pixel_values"]).latent_dist
            torch.testing.assert_close(mine["latent_mean"], posterior.mean, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine["text_hidden"].float(), text_encoder.encode(theirs["captions"]).hidden,
                                       atol=1e-2, rtol=2**-7)
        for key, caption in zip(mine["keys"], mine["captions"]):
            seen[key].add(caption)
    assert loader.source_sample_counts == uncached.source_sample_counts
    per_source = [sum(c for c, s in zip(loader.counts, loader.streams) if s.source == i) for i in range(2)]
    assert per_source == [round(epoch * 3 / 4), round(epoch / 4)]  # weights 3:1 of the epoch's 9 batches: 7 + 2
    assert list(loader.source_sample_counts.values()) == [3 * 2 * n for n in per_source]
    assert any(len(c) > 1 for c in seen.values()), "list captions must vary over epochs"


def test_caption_picks_follow_the_samples_own_draws(cached):
    cfg, _, cache = cached
    loader = CachedPlannedLoader(cache, cfg, batch_size=2, seed=11)
    for _ in range(4 * sum(loader.counts)):
        before = {k: list(p) for k, p in loader.stream_positions.items()}
        batch = next(loader)
        k = loader.schedule.stream_at(loader.step - 1)
        epoch = before.get(k, [0, 0])[0]
        for identity, caption in zip(batch["identities"], batch["captions"]):
            row = cache.identities.index(identity)
            if loader.stream_positions[k][0] != epoch:  # the batch crossed into k's next epoch
                continue
            raw = cache.caption_variants[row]
            draws = sample_draws(11, epoch, cache.identities[row])
            assert caption == resolve_caption(raw, missing="skip", choice=draws.caption)


def test_square_cache_picks_list_captions_as_the_uncached_loader(tmp_path, sources, vae):
    a, _ = sources
    cfg = data.DataConfig(source=a, resolution=16)
    cache = build(spec_for(cfg, tmp_path), vae)
    loader = cached_loader(cache, cfg, batch_size=2, seed=5)
    assert isinstance(loader, CachedLatentLoader)
    uncached = data.build_loader(cfg, batch_size=2, seed=5)
    share = len(cache) // 2 * 2  # 12 samples, batches of 2: epochs end on batch boundaries
    for epoch in range(4):
        mine = {k: c for _ in range(share // 2) for b in [next(loader)] for k, c in zip(b["keys"], b["captions"])}
        theirs = {k: c for _ in range(share // 2) for b in [next(uncached)] for k, c in zip(b["keys"], b["captions"])}
        assert mine == theirs, epoch


def test_the_key_holds_buckets_and_sources_but_not_weights(cached, sources):
    cfg, spec, cache = cached
    a, b = sources
    assert cache_is_valid(spec.cache_dir, spec_for(mixed_cfg(sources, (1, 1)), spec.cache_dir, None).key)
    others = {"buckets": mixed_cfg(sources).replace(buckets=("64x64", "128x64")),
              "sources": mixed_cfg(sources).replace(sources=(f"{b}#weight=3", f"{a}#weight=1")),
              "sources ": mixed_cfg(sources).replace(sources=(f"{a}#weight=3&caption_column=alt", f"{b}#weight=1"))}
    for field, other in others.items():
        with pytest.raises(StaleCacheError, match=f"'{field.strip()}'"):
            open_cache(spec.cache_dir, spec_for(other, spec.cache_dir).key)
    with pytest.raises(StaleCacheError, match="'buckets'"):
        open_cache(spec.cache_dir, spec_for(data.DataConfig(sources=cfg.sources, resolution=64, crop="center",
                                                             flip=True), spec.cache_dir).key)


def test_resume_is_exact_and_ranks_hold_the_same_bucket_at_every_step(cached):
    cfg, _, cache = cached
    straight = CachedPlannedLoader(cache, cfg, batch_size=2, seed=0)
    reference = [next(straight) for _ in range(9)]
    first = CachedPlannedLoader(cache, cfg, batch_size=2, seed=0)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = CachedPlannedLoader(cache, cfg, batch_size=2, seed=0)
    resumed.load_state_dict([state])
    for want in reference[4:]:
        got = next(resumed)
        assert got["keys"] == want["keys"] and got["captions"] == want["captions"]
        assert torch.equal(got["latent_mean"], want["latent_mean"]) and torch.equal(got["flipped"], want["flipped"])
    assert resumed.source_sample_counts == straight.source_sample_counts
    with pytest.raises(ValueError, match="world_size"):
        CachedPlannedLoader(cache, cfg, batch_size=2, seed=0, rank=0, world_size=2).load_state_dict(state)
    ranks = [CachedPlannedLoader(cache, cfg, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(2 * sum(ranks[0].counts)):
        shapes = [next(r)["latent_mean"].shape for r in ranks]
        assert shapes[0] == shapes[1]


def test_changed_weights_reuse_the_cache_with_the_new_mix(cached, sources):
    _, spec, cache = cached
    loader = cached_loader(cache, mixed_cfg(sources, (1, 3)), batch_size=2, seed=0)
    for _ in range(2 * sum(loader.counts)):
        next(loader)
    per_source = [sum(c for c, s in zip(loader.counts, loader.streams) if s.source == i) for i in range(2)]
    total = sum(loader.counts)
    assert per_source == [round(total / 4), round(total * 3 / 4)]  # now 1:3
    assert list(loader.source_sample_counts.values()) == [2 * 2 * n for n in per_source]
