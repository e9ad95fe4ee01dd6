"""Several sources mixed: weights and repeats give exact shares per epoch, on every rank and after a
resume; each source has its own caption column and caption policy; every CLI form still parses."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import pytest

import _data_fixtures as fx
from data import DataConfig, DataConfigError, build_loader, iterate_once


def make_source(root: Path, prefix: str, n: int, *, column: str | None = None, captions: bool = True) -> str:
    """n PNGs named PREFIXnnn; captions in metadata.jsonl column `column`, or sidecar .txt files."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        fx.textured(i + (100 if prefix == "b" else 0)).save(root / f"{prefix}{i:03d}.png")
        if column:
            rows.append({"file_name": f"{prefix}{i:03d}.png", column: f"{column} of {prefix}{i}"})
        elif captions:
            (root / f"{prefix}{i:03d}.txt").write_text(f"txt of {prefix}{i}")
    if rows:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return make_source(root / "a", "a", 8, column="alt"), make_source(root / "b", "b", 8)


def cfg_for(*entries: str, **overrides) -> DataConfig:
    return DataConfig(sources=entries, **{**dict(resolution=16, max_bad_fraction=0.9, bad_fraction_min_seen=10), **overrides})


def origin(batch: dict) -> str:
    (prefix,) = {k[0] for k in batch["keys"]}  # one source per batch
    return prefix


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("options", [("weight=3", "weight=1"), ("repeat=3", "repeat=1")])
def test_two_sources_3_to_1_exactly_per_epoch_with_their_own_caption_columns(two, options):
    a, b = two
    loader = build_loader(cfg_for(f"{a}#{options[0]}&caption_column=alt", f"{b}#{options[1]}"), batch_size=2, seed=0)
    epoch = sum(loader.counts)
    batches = take(loader, 3 * epoch)
    for e in range(3):
        shares = collections.Counter(origin(x) for x in batches[e * epoch:(e + 1) * epoch])
        assert shares["a"] == 3 * shares["b"] > 0, shares
    counts = loader.source_sample_counts
    assert counts[a] == 3 * counts[b] and counts[a] + counts[b] == 2 * 3 * epoch
    for x in batches:
        expected = "alt of" if origin(x) == "a" else "txt of"
        assert all(c.startswith(expected) for c in x["captions"]), x["captions"]


def test_each_source_keeps_its_own_missing_caption_policy(tmp_path):
    a = make_source(tmp_path / "a", "a", 8)
    for i in range(0, 8, 2):
        (tmp_path / "a" / f"a{i:03d}.txt").unlink()
    b = make_source(tmp_path / "b", "b", 4, captions=False)
    loader = build_loader(cfg_for(a, f"{b}#missing_caption=empty"), batch_size=2, seed=0)
    batches = take(loader, 2 * sum(loader.counts))
    assert {origin(x) for x in batches} == {"a", "b"}
    assert all(c == "" for x in batches if origin(x) == "b" for c in x["captions"])
    assert all(int(k[1:]) % 2 for x in batches if origin(x) == "a" for k in x["keys"])  # captioned ones only
    assert loader.bad_sample_counts["missing_caption"] >= 4  # a's uncaptioned images: skipped and counted


def test_the_mix_is_the_same_on_every_rank_and_resumes_exactly(two):
    a, b = two
    cfg = cfg_for(f"{a}#weight=3&caption_column=alt", f"{b}#weight=1")
    loaders = [build_loader(cfg, batch_size=2, seed=5, rank=r, world_size=2, num_workers=w) for r, w in ((0, 0), (1, 2))]
    runs = [take(loader, 8) for loader in loaders]
    assert [origin(x) for x in runs[0]] == [origin(x) for x in runs[1]]
    rank0 = take(build_loader(cfg, batch_size=2, seed=5, rank=0, world_size=2, num_workers=2), 8)
    assert [x["keys"] for x in rank0] != [x["keys"] for x in runs[0]]  # the order depends on the lanes...
    assert [origin(x) for x in rank0] == [origin(x) for x in runs[0]]  # ...the schedule does not
    # one lane each: the ranks read disjoint parts of each permutation (8 // 2 samples of a each)
    rank1 = take(build_loader(cfg, batch_size=2, seed=5, rank=1, world_size=2), 8)
    first_share = [[k for x in run if origin(x) == "a" for k in x["keys"]][:4] for run in (runs[0], rank1)]
    assert not set(first_share[0]) & set(first_share[1]), "the ranks read the same samples"
    assert loaders[0].source_sample_counts == loaders[1].source_sample_counts
    state = json.loads(json.dumps(loaders[1].state_dict()))
    rest = take(loaders[1], 10)
    resumed = build_loader(cfg, batch_size=2, seed=5, rank=1, world_size=2, num_workers=2)
    resumed.load_state_dict(state)
    again = take(resumed, 10)
    assert [x["keys"] for x in again] == [x["keys"] for x in rest]
    assert resumed.source_sample_counts == loaders[1].source_sample_counts


def test_a_folder_shards_and_a_dataset_mix_and_iterate_once_reads_each_once(tmp_path):
    import datasets

    folder = make_source(tmp_path / "a", "a", 3)
    fx.write_tar(tmp_path / "shards" / "shard-000000.tar", fx.good_members(0, 4, prefix="s"))
    rows = {"image": [fx.textured(i) for i in range(5)], "text": [f"row {i}" for i in range(5)]}
    datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")})).save_to_disk(str(tmp_path / "disk"))
    cfg = cfg_for(folder, str(tmp_path / "shards"), f"{tmp_path / 'disk'}#repeat=2")
    loader = build_loader(cfg, batch_size=2, seed=0)
    take(loader, 2 * sum(loader.counts))
    counts = loader.source_sample_counts
    # per epoch: round(5 / 2 x 2) = 5 batches of the dataset, round(3 / 2) = 2 of the folder, 2 of the shards
    assert counts == {str(tmp_path / "disk"): 2 * 5 * 2, folder: 2 * 2 * 2, str(tmp_path / "shards"): 2 * 2 * 2}
    keys = [k for batch in iterate_once(cfg, batch_size=2) for k in batch["keys"]]
    assert len(keys) == 12 and len(set(keys)) == 12


def test_bad_mixes_are_refused_with_a_message(two):
    a, b = two
    with pytest.raises(DataConfigError, match="weight= on every source"):
        cfg_for(f"{a}#weight=3", b)
    with pytest.raises(DataConfigError, match="not one of"):
        cfg_for(f"{a}#wieght=3")
    with pytest.raises(DataConfigError, match="either source"):
        DataConfig(source=a, sources=(b,))
    assert cfg_for(a, b).with_source(a).sources == ()


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A stand-in for an entry point's config."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """The data."""


def test_every_cli_form_parses(two, tmp_path):
    from ldm.cli import parse_config

    a, b = two
    assert parse_config(_Entry, args=["--data", a]).data.source == a
    cfg = parse_config(_Entry, args=["--data.source", a, "--data.caption-column", "alt", "--data.buckets", "sdxl", "64x128"])
    assert (cfg.data.source, cfg.data.caption_column, cfg.data.buckets) == (a, "alt", ("sdxl", "64x128"))
    cfg = parse_config(_Entry, args=["--data.sources", f"{a}#weight=3&caption_column=alt", f"{b}#weight=1"])
    assert cfg.data.sources == (f"{a}#weight=3&caption_column=alt", f"{b}#weight=1")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data": {"sources": [{"source": a, "repeat": 3, "caption_column": "alt"}, b],
                                           "buckets": "sdxl"}}))
    cfg = parse_config(_Entry, args=["--config", str(config)])
    assert cfg.data.sources == (f"{a}#repeat=3&caption_column=alt", b) and cfg.data.buckets == ("sdxl",)


def test_data_given_several_times_becomes_one_sources_list():
    from data.mix import expand_data_flags

    assert expand_data_flags(["--data", "a", "--run.steps", "3"]) == ["--data.source", "a", "--run.steps", "3"]
    assert expand_data_flags(["--x", "1", "--data", "a#weight=3", "--data=b#weight=1", "--y"]) == [
        "--x", "1", "--data.sources", "a#weight=3", "b#weight=1", "--y"]
    assert expand_data_flags(["--data.caption-column", "alt", "--data", "--help"]) == [
        "--data.caption-column", "alt", "--data", "--help"]  # no value: left for tyro to complain about
