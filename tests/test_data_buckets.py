"""Aspect-ratio buckets: the bucket list, nearest-ratio assignment, cover-and-crop, one bucket per
batch, the same bucket on every rank at every step, proportional visits, exact resume, all sources."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import _data_fixtures as fx
from data import DataConfig, DataConfigError, build_loader, iterate_once
from data.buckets import BUCKET_MULTIPLE, SDXL_1024, cover_crop_resize, nearest_bucket, resolve_buckets

COUNTS = {"portrait": 6, "landscape": 9, "panorama": 3, "square": 5, "tiny": 3}
# resolution 128, sdxl: portrait 96x160 -> 128x192, landscape -> 192x128, panorama 320x64 -> 256x64,
# square and tiny (24x20) -> 128x128
EXPECTED_BUCKET = {"portrait": (192, 128), "landscape": (128, 192), "panorama": (64, 256), "square": (128, 128),
                   "tiny": (128, 128)}  # (H, W) of the batch tensors


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    fx.make_mixed_shape_folder(root, COUNTS)
    return str(root)


def cfg_for(source: str, **overrides) -> DataConfig:
    options = dict(resolution=128, buckets=("sdxl",), flip=True, max_bad_fraction=0.9, bad_fraction_min_seen=10)
    return DataConfig(source=source, **{**options, **overrides})


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def kind(key: str) -> str:
    return key.rstrip("0123456789")


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(x["keys"] == y["keys"] and torch.equal(x["pixel_values"], y["pixel_values"])
               and torch.equal(x["crop_top_left"], y["crop_top_left"]) for x, y in zip(a, b, strict=True))


def test_sdxl_preset_is_sdxls_list_at_1024_and_scales_in_multiples_of_64():
    assert resolve_buckets(("sdxl",), 1024) == sorted(SDXL_1024, key=lambda b: b[0] / b[1])
    for resolution in (64, 128, 512, 768):
        buckets = resolve_buckets(("sdxl",), resolution)
        assert all(w % BUCKET_MULTIPLE == 0 and h % BUCKET_MULTIPLE == 0 for w, h in buckets)
        assert (resolution // 64 * 64, resolution // 64 * 64) in buckets or resolution % 64
    assert resolve_buckets(("512x768", "sdxl"), 512)[0] == (256, 1024)
    for bad in ("500x500", "512", "sdxl2", "0x64"):
        with pytest.raises(DataConfigError, match="bucket"):
            DataConfig(buckets=(bad,))


def test_nearest_bucket_is_nearest_in_log_ratio():
    buckets = [(64, 256), (128, 128), (256, 64)]
    assert nearest_bucket(buckets, 100, 100) == 1
    assert nearest_bucket(buckets, 100, 180) == 1 and nearest_bucket(buckets, 100, 220) == 2  # 2:1 is nearer 1:1
    assert nearest_bucket(buckets, 180, 100) == 1 and nearest_bucket(buckets, 220, 100) == 0  # ... both ways


def test_cover_crop_resize_crops_only_the_long_side_and_records_the_corner():
    img = fx.textured(0, (64, 32))  # W x H: 2:1
    exact, corner = cover_crop_resize(img, (64, 32), 0.5, 0.5)
    assert corner == (0, 0) and exact.shape == (3, 32, 64)
    assert torch.equal(exact, torch.from_numpy(np.array(img)).permute(2, 0, 1).float().mul_(1 / 127.5).sub_(1))
    cropped, corner = cover_crop_resize(img, (32, 32), 1.0, 0.5)  # the right-hand square
    assert corner == (0, 32)
    assert torch.equal(cropped, exact[:, :, 32:])
    wide, corner = cover_crop_resize(img, (128, 32), 0.0, 0.0)  # upscaled x2 to cover, cut vertically
    assert wide.shape == (3, 32, 128) and corner == (0, 0)


def test_every_batch_holds_one_bucket_of_the_right_images(mixed):
    loader = build_loader(cfg_for(mixed), batch_size=2, seed=0)
    assert loader.bucket_histogram == {"128x192": 6, "192x128": 9, "256x64": 3, "128x128": 8}
    for batch in take(loader, 12):
        shape = tuple(batch["pixel_values"].shape[-2:])
        assert {EXPECTED_BUCKET[kind(k)] for k in batch["keys"]} == {shape}, batch["keys"]
        assert batch["crop_top_left"].shape == (2, 2)


def test_buckets_are_visited_in_proportion_to_their_size(mixed):
    loader = build_loader(cfg_for(mixed), batch_size=2, seed=0)
    epoch = sum(loader.counts)
    shapes = collections.Counter(tuple(b["pixel_values"].shape[-2:]) for b in take(loader, 3 * epoch))
    # per schedule epoch: round(samples / batch size) batches of each bucket
    assert shapes == {(192, 128): 9, (128, 192): 12, (64, 256): 6, (128, 128): 12}


def test_same_seed_same_batches_and_order_depends_on_seed(mixed):
    a = take(build_loader(cfg_for(mixed), batch_size=2, seed=1), 6)
    assert same_batches(a, take(build_loader(cfg_for(mixed), batch_size=2, seed=1), 6))
    c = take(build_loader(cfg_for(mixed), batch_size=2, seed=2), 6)
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


def test_every_rank_holds_the_same_bucket_at_every_step(mixed):
    loaders = [build_loader(cfg_for(mixed), batch_size=2, seed=0, rank=r, world_size=2, num_workers=w)
               for r, w in ((0, 0), (1, 2))]  # the bucket order must not depend on the worker count either
    batches = [take(loader, 16) for loader in loaders]
    assert [b["pixel_values"].shape for b in batches[0]] == [b["pixel_values"].shape for b in batches[1]]
    first = [set(k for b in rank[:4] for k in b["keys"] if kind(k) == "landscape") for rank in batches]
    assert not first[0] & first[1], "the ranks read the same landscape images"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(mixed, workers):
    loader = build_loader(cfg_for(mixed), batch_size=2, seed=3, num_workers=workers)
    take(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))
    rest = take(loader, 14)  # crosses sub-stream and schedule epochs
    resumed = build_loader(cfg_for(mixed), batch_size=2, seed=3, num_workers=workers)
    resumed.load_state_dict(state)
    assert same_batches(rest, take(resumed, 14))
    if workers:  # 2 lanes read by one worker: the same order
        fewer = build_loader(cfg_for(mixed), batch_size=2, seed=3, num_workers=1)
        fewer.load_state_dict(state)
        assert same_batches(rest, take(fewer, 14))


def test_a_resume_with_other_buckets_is_refused(mixed):
    state = build_loader(cfg_for(mixed), batch_size=2, seed=3).state_dict()
    other = build_loader(cfg_for(mixed, buckets=("128x128", "256x64")), batch_size=2, seed=3)
    with pytest.raises(DataConfigError, match="buckets"):
        other.load_state_dict(state)
    square = build_loader(cfg_for(mixed, buckets=()), batch_size=2, seed=3)
    with pytest.raises(DataConfigError, match="bucketed or mixed"):
        square.load_state_dict(state)
    with pytest.raises(DataConfigError, match="kind"):
        build_loader(cfg_for(mixed), batch_size=2, seed=3).load_state_dict(square.state_dict())


def test_bad_images_are_replaced_from_their_bucket_and_counted(tmp_path):
    fx.make_mixed_shape_folder(tmp_path, {"landscape": 4, "square": 4})
    (tmp_path / "broken.png").write_bytes(b"not an image")  # header unreadable: assigned to 1:1
    (tmp_path / "broken.txt").write_text("x")
    truncated = fx.encode(fx.textured(3, (160, 96)))
    (tmp_path / "cut.png").write_bytes(truncated[: len(truncated) // 2])  # header fine: landscape bucket
    (tmp_path / "cut.txt").write_text("x")
    loader = build_loader(cfg_for(str(tmp_path)), batch_size=2, seed=0)
    batches = take(loader, 12)
    assert all(len(b["keys"]) == 2 for b in batches)
    assert set(loader.bad_sample_counts) <= {"not_an_image", "truncated_image", "corrupt_image"}
    assert sum(loader.bad_sample_counts.values()) >= 2


def test_iterate_once_gives_every_image_once_at_its_bucket(mixed):
    seen = {}
    for rank in range(2):
        for batch in iterate_once(cfg_for(mixed), batch_size=4, rank=rank, world_size=2):
            for key in batch["keys"]:
                seen[key] = tuple(batch["pixel_values"].shape[-2:])
    assert len(seen) == sum(COUNTS.values())
    assert all(shape == EXPECTED_BUCKET[kind(key)] for key, shape in seen.items())


def test_datasets_source_is_bucketed_by_its_image_headers(tmp_path):
    import datasets

    sizes = [(96, 160), (160, 96), (160, 96), (128, 128)]
    rows = {"image": [fx.textured(i, s) for i, s in enumerate(sizes)], "text": [f"c{i}" for i in range(4)]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "disk"))
    loader = build_loader(cfg_for(str(tmp_path / "disk")), batch_size=1, seed=0)
    assert loader.bucket_histogram == {"128x192": 1, "192x128": 2, "128x128": 1}
    for batch in take(loader, 8):
        w, h = sizes[int(batch["keys"][0])]
        assert tuple(batch["pixel_values"].shape[-2:]) == {(96, 160): (192, 128), (160, 96): (128, 192)}.get((w, h), (128, 128))


def test_shards_are_bucketed_by_prepare_data_and_read_one_bucket_per_batch(mixed, tmp_path):
    from launch import prepare_data

    out = tmp_path / "shards"
    prepare_data.main(["--data", mixed, "--out", str(out), "--data.buckets", "sdxl", "--data.resolution", "128",
                       "--samples-per-shard", "4"])
    names = sorted(p.name for p in out.glob("*.tar"))
    assert "shard-b256x64-000000.tar" in names and "shard-b192x128-000002.tar" in names  # 9 landscapes: 3 shards
    loader = build_loader(cfg_for(str(out)), batch_size=2, seed=0, world_size=2, rank=1)
    assert loader.bucket_histogram == {"128x192": 6, "192x128": 9, "256x64": 3, "128x128": 8}  # from stats.json
    for batch in take(loader, 10):
        assert {EXPECTED_BUCKET[kind(k)] for k in batch["keys"]} == {tuple(batch["pixel_values"].shape[-2:])}
    state = loader.state_dict()
    rest = take(loader, 6)
    resumed = build_loader(cfg_for(str(out)), batch_size=2, seed=0, world_size=2, rank=1)
    resumed.load_state_dict(state)
    assert same_batches(rest, take(resumed, 6))
    once = {k: tuple(b["pixel_values"].shape[-2:]) for r in range(2)
            for b in iterate_once(cfg_for(str(out)), batch_size=3, rank=r, world_size=2) for k in b["keys"]}
    assert len(once) == sum(COUNTS.values()) and all(s == EXPECTED_BUCKET[kind(k)] for k, s in once.items())


def test_unbucketed_shards_with_buckets_say_how_to_prepare_them(tmp_path):
    fx.make_shards(tmp_path, 1, 3)
    with pytest.raises(DataConfigError, match="prepare_data .*--data.buckets sdxl"):
        build_loader(cfg_for(str(tmp_path)), batch_size=2, seed=0)


def test_the_square_path_records_its_crop_corner_too(tmp_path):
    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("w")
    batch = next(iter(iterate_once(DataConfig(source=str(tmp_path), resolution=20), batch_size=1)))
    assert batch["crop_top_left"].tolist() == [[0, math.floor(0.5 * 20 + 0.5)]]  # centre of 40 x 20 resized


@pytest.mark.parametrize("workers", [0, 2])
def test_a_finite_pass_resumes_without_losing_or_repeating_an_image(mixed, workers):
    first = iterate_once(cfg_for(mixed), batch_size=3, num_workers=workers)
    head = [next(first)["keys"] for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    tail = [b["keys"] for b in first]
    resumed = iterate_once(cfg_for(mixed), batch_size=3, num_workers=workers)
    resumed.load_state_dict(state)
    again = [b["keys"] for b in resumed]
    assert sorted(k for b in again for k in b) == sorted(k for b in tail for k in b)
    assert len({k for b in head + again for k in b}) == sum(COUNTS.values())
