"""The loader contract: batch format, determinism, per-rank split, exact resume, bad-sample budget."""

from __future__ import annotations

import json

import pytest
import torch

import _data_fixtures as fx
from data import DataConfig, TooManyBadSamples, build_loader, iterate_once


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    fx.make_image_folder(root, 10)
    return str(root)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of 6; shard 1 also holds 3 broken images, so its ranks see uneven data."""
    root = tmp_path_factory.mktemp("shards")
    fx.make_shards(root, 3, 6)
    broken = [(f"bad{i}.png", b"broken") for i in range(3)] + [(f"bad{i}.txt", b"x") for i in range(3)]
    fx.write_tar(root / "shard-000001.tar", fx.good_members(6, 6) + sorted(broken))
    return str(root)


def cfg_for(source: str, **overrides) -> DataConfig:
    options = dict(resolution=16, flip=True, shuffle_block=4, max_bad_fraction=0.9, bad_fraction_min_seen=10)
    return DataConfig(source=source, **{**options, **overrides})


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(x["keys"] == y["keys"] and x["captions"] == y["captions"]
               and torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b, strict=True))


def test_batches_follow_the_contract_and_the_stream_is_endless(folder):
    loader = build_loader(cfg_for(folder), batch_size=3, seed=0)
    batches = take(loader, 8)  # 24 samples: well past one epoch of 10
    batch = batches[0]
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["original_sizes"].dtype == torch.long and batch["original_sizes"].shape == (3, 2)
    assert isinstance(batch["captions"][0], str) and isinstance(batch["keys"][0], str)
    first_epoch = [k for b in batches for k in b["keys"]][:10]
    assert len(set(first_epoch)) == 10, "an epoch must visit every sample once"
    assert loader.epoch == 2


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_same_seed_same_batches_other_seed_other_order(source, request):
    spec = request.getfixturevalue(source)
    a, b = take(build_loader(cfg_for(spec), batch_size=4, seed=1), 5), take(build_loader(cfg_for(spec), batch_size=4, seed=1), 5)
    assert same_batches(a, b)
    c = take(build_loader(cfg_for(spec), batch_size=4, seed=2), 5)
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


def test_map_source_batches_do_not_depend_on_the_worker_count(folder):
    a = take(build_loader(cfg_for(folder), batch_size=4, seed=5, num_workers=0), 6)
    b = take(build_loader(cfg_for(folder), batch_size=4, seed=5, num_workers=2), 6)
    assert same_batches(a, b)


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_resume_gives_exactly_the_uninterrupted_batches(source, request):
    spec = request.getfixturevalue(source)
    loader = build_loader(cfg_for(spec), batch_size=4, seed=3)
    take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))  # must survive JSON
    rest = take(loader, 6)  # crosses an epoch boundary and the broken shard
    resumed = build_loader(cfg_for(spec), batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert same_batches(rest, take(resumed, 6))
    assert resumed.bad_sample_counts == loader.bad_sample_counts
    assert resumed.source_sample_counts == loader.source_sample_counts == {spec: 4 * 9}


def test_shard_order_depends_on_lanes_not_workers_and_resumes_with_fewer_workers(shards):
    loader = build_loader(cfg_for(shards), batch_size=3, seed=4, num_workers=2)  # 2 lanes
    take(loader, 1)
    state = loader.state_dict()
    assert state["position"]["next_lane"] == 1, "the test needs a resume point in the middle of a lane cycle"
    rest = take(loader, 4)
    resumed = build_loader(cfg_for(shards), batch_size=3, seed=4, num_workers=1)
    resumed.load_state_dict(state)  # 1 worker serves both lanes: same order
    assert same_batches(rest, take(resumed, 4))


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_ranks_see_disjoint_samples_and_always_full_batches(source, request):
    spec = request.getfixturevalue(source)
    loaders = [build_loader(cfg_for(spec), batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    per_epoch = 4 if source == "folder" else 8  # folder: 10 // 2 = 5 each; shards: 18 good, uneven
    keys = [[k for b in take(loader, per_epoch // 2) for k in b["keys"]] for loader in loaders]
    assert not set(keys[0]) & set(keys[1])
    more = [take(loader, 10) for loader in loaders]  # the rank with the broken shard keeps up
    assert all(b["pixel_values"].shape[0] == 2 for batches in more for b in batches)


def test_too_many_bad_samples_abort_with_a_message_about_the_data(tmp_path):
    junk = [(f"b{i}.{ext}", data) for i in range(8) for ext, data in (("png", b"junk"), ("txt", b"c"))]
    fx.write_tar(tmp_path / "s.tar", fx.good_members(0, 2) + junk)
    loader = build_loader(cfg_for(str(tmp_path / "s.tar"), max_bad_fraction=0.3, bad_fraction_min_seen=5),
                          batch_size=2, seed=0)
    with pytest.raises(TooManyBadSamples, match=r"Dataset problem in .*not_an_image: \d+"):
        take(loader, 5)


def test_iterate_once_covers_every_sample_once_across_ranks(folder, shards):
    for spec, expected in ((folder, 10), (shards, 18)):
        seen = []
        for rank in range(2):
            for batch in iterate_once(cfg_for(spec), batch_size=4, rank=rank, world_size=2):
                seen.extend(batch["keys"])
        assert len(seen) == expected and len(set(seen)) == expected
    a = list(iterate_once(cfg_for(folder), batch_size=4))
    b = list(iterate_once(cfg_for(folder, crop="random"), batch_size=4))
    assert same_batches(a, b), "iterate_once must be centre-cropped, unflipped and in stored order"
