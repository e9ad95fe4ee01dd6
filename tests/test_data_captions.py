"""Tag shuffling of tag-style captions: keep-first-N, a function of (seed, epoch, sample) whatever
the worker count, exact on resume, per source in a mix, off in deterministic passes, refused with
the latent cache."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

import _data_fixtures as fx
from data import DataConfig, DataConfigError, build_loader, iterate_once
from data.captions import TagShuffle, resolve_caption, shuffle_tags
from data.mix import parse_source_entry
from data.sample import CENTER_DRAWS, RawRecord, make_sample, sample_draws

TAGS = ["trigger", "solo", "red hair", "smile", "outdoors", "sky", "tree"]


def make_tagged(root: Path, prefix: str, n: int, tags: list[str] = TAGS, sep: str = ", ") -> str:
    """n PNGs whose sidecar captions are `tags` plus one tag naming the image, joined by `sep`."""
    root.mkdir(parents=True)
    for i in range(n):
        fx.textured(i).save(root / f"{prefix}{i:03d}.png")
        (root / f"{prefix}{i:03d}.txt").write_text(sep.join([*tags, f"{prefix}{i:03d}"]))
    return str(root)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    return make_tagged(tmp_path_factory.mktemp("tagged") / "t", "t", 8)


def cfg_for(source: str = "", **overrides) -> DataConfig:
    return DataConfig(source=source, **{**dict(resolution=16, shuffle_tags=True, keep_tags=1), **overrides})


def captions_of(loader, n: int) -> list[tuple[str, str]]:
    """(key, caption) of the next n batches."""
    return [kc for _ in range(n) for kc in (lambda b: zip(b["keys"], b["captions"]))(next(loader))]


def test_shuffle_keeps_the_first_tags_and_the_multiset_of_tags():
    text = ", ".join(TAGS)
    orders = {shuffle_tags(text, TagShuffle(keep=2), seed) for seed in range(20)}
    assert len(orders) > 10, "the tags after the kept ones are not permuted"
    for order in orders:
        tags = order.split(", ")
        assert tags[:2] == TAGS[:2] and sorted(tags) == sorted(TAGS)
    assert shuffle_tags(text, TagShuffle(keep=2), 5) == shuffle_tags(text, TagShuffle(keep=2), 5)
    assert shuffle_tags(text, TagShuffle(keep=len(TAGS)), 5) == text  # everything kept
    assert shuffle_tags("one tag", TagShuffle(), 5) == "one tag"


def test_separator_spacing_and_empty_tags():
    shuffled = shuffle_tags("a;b ;  c;;d;", TagShuffle(keep=4, separator=";"), 1)
    assert shuffled == "a; b; c; d"  # stripped, empty ones dropped, joined by the separator and a space
    assert shuffle_tags("a b c", TagShuffle(keep=3, separator=" "), 1) == "a b c"
    assert TagShuffle(separator=" | ").joiner() == " | " and TagShuffle(separator="\t").joiner() == "\t"


def test_a_list_caption_is_chosen_first_then_shuffled_and_off_means_untouched():
    raw = ["x, y, z, w", "p, q, r, s"]
    out = resolve_caption(raw, missing="skip", choice=0.9, tags=TagShuffle(keep=1), tag_seed=3)
    assert out.startswith("p, ") and sorted(out.split(", ")) == ["p", "q", "r", "s"]
    assert resolve_caption(raw, missing="skip", choice=0.9, tags=TagShuffle(keep=1), tag_seed=None) == "p, q, r, s"
    assert resolve_caption("x,y,  z", missing="skip", choice=0.0) == "x,y,  z"  # no policy: as stored
    assert resolve_caption(None, missing="empty", choice=0.0, tags=TagShuffle(), tag_seed=3) == ""


def test_make_sample_shuffles_per_epoch_but_never_without_augmentation():
    caption = ", ".join(TAGS)
    record = RawRecord(key="k", origin="t", image=fx.encode(fx.textured(0)), caption=caption)
    cfg = cfg_for()
    by_epoch = [make_sample(record, cfg, sample_draws(0, e, "k"))["caption"] for e in range(12)]
    assert len(set(by_epoch)) > 6 and all(c.split(", ")[0] == "trigger" for c in by_epoch)
    assert make_sample(record, cfg, sample_draws(0, 3, "k"))["caption"] == by_epoch[3]
    assert make_sample(record, cfg, sample_draws(0, 3, "k"), augment=False)["caption"] == caption
    assert make_sample(record, cfg, CENTER_DRAWS)["caption"] == caption
    assert make_sample(record, cfg.replace(shuffle_tags=False), sample_draws(0, 3, "k"))["caption"] == caption


def test_loader_order_is_a_function_of_seed_epoch_sample_whatever_the_workers(tagged):
    a = captions_of(build_loader(cfg_for(tagged), batch_size=4, seed=7, num_workers=0), 6)  # 3 epochs
    b = captions_of(build_loader(cfg_for(tagged), batch_size=4, seed=7, num_workers=2), 6)
    assert a == b
    per_image = collections.defaultdict(set)
    for key, caption in a:
        assert caption.startswith("trigger, ") and sorted(caption.split(", ")) == sorted([*TAGS, key])
        per_image[key].add(caption)
    assert len(per_image) == 8 and all(len(v) == 3 for v in per_image.values()), "an order repeated across epochs"
    c = captions_of(build_loader(cfg_for(tagged), batch_size=4, seed=8), 6)
    assert a != c


def test_resume_gives_exactly_the_uninterrupted_captions(tagged):
    loader = build_loader(cfg_for(tagged), batch_size=3, seed=2)
    captions_of(loader, 2)
    state = json.loads(json.dumps(loader.state_dict()))
    rest = captions_of(loader, 5)  # crosses an epoch boundary
    resumed = build_loader(cfg_for(tagged), batch_size=3, seed=2)
    resumed.load_state_dict(state)
    assert captions_of(resumed, 5) == rest


def test_iterate_once_keeps_the_stored_order(tagged):
    for batch in iterate_once(cfg_for(tagged), batch_size=4):
        for key, caption in zip(batch["keys"], batch["captions"]):
            assert caption == ", ".join([*TAGS, key])


def test_each_source_of_a_mix_has_its_own_tag_policy(tmp_path):
    a = make_tagged(tmp_path / "a", "a", 4)
    b = make_tagged(tmp_path / "b", "b", 4, sep=" | ")
    cfg = DataConfig(sources=(a, f"{b}#shuffle_tags=true&keep_tags=0&tag_separator=|"), resolution=16)
    assert not cfg.shuffle_tags and cfg.shuffles_tags()
    loader = build_loader(cfg, batch_size=4, seed=1)
    seen = collections.defaultdict(set)
    for _ in range(8):
        batch = next(loader)
        for key, caption in zip(batch["keys"], batch["captions"]):
            seen[key[0]].add(caption)
    assert seen["a"] == {", ".join([*TAGS, f"a{i:03d}"]) for i in range(4)}, "source a must keep its stored order"
    assert len(seen["b"]) > 4, "source b's tags are not shuffled"
    for caption in seen["b"]:  # '|' splits, joined again as '| ' (the separator and a space)
        tags = caption.split("| ")
        assert len(tags) == len(TAGS) + 1 and set(TAGS) <= set(tags), caption
    assert parse_source_entry(f"{b}#shuffle_tags=no").shuffle_tags is False
    assert DataConfig(sources=(a, b), resolution=16, shuffle_tags=True).shuffles_tags()


@pytest.mark.parametrize("entry, message", [("x#shuffle_tags=maybe", "true or false"),
                                            ("x#keep_tags=-1", "whole number"), ("x#keep_tags=two", "whole number"),
                                            ("x#tag_separator=", "must not be empty")])
def test_bad_per_source_tag_options_are_refused(entry, message):
    with pytest.raises(DataConfigError, match=message):
        DataConfig(sources=(entry, "y"))


def test_bad_tag_options_are_refused():
    with pytest.raises(DataConfigError, match="keep_tags=-1 must be >= 0"):
        DataConfig(shuffle_tags=True, keep_tags=-1)
    with pytest.raises(DataConfigError, match="tag_separator must not be empty"):
        DataConfig(shuffle_tags=True, tag_separator="")


def parse_train_ldm(args: list[str]):
    from launch.train_ldm import PRESETS, TrainLDMConfig
    from ldm.cli import parse_config

    return parse_config(TrainLDMConfig, PRESETS, ["--preset", "tiny", *args])


@pytest.mark.parametrize("cache_flags", [["--cache-latents"], ["--cache-text"], ["--cache-latents", "--cache-text"]])
def test_train_ldm_refuses_the_latent_cache_with_tag_shuffling(tmp_path, cache_flags, capsys):
    out = ["--run.output-dir", str(tmp_path / "out")]
    for data in (["--data.source", str(tmp_path), "--data.shuffle-tags"],
                 ["--data.sources", f"{tmp_path}#shuffle_tags=1", str(tmp_path / "other")]):  # one source of a mix
        with pytest.raises(SystemExit):
            parse_train_ldm([*data, *out, *cache_flags])
        assert "--data.shuffle-tags permutes tags anew each epoch" in " ".join(
            capsys.readouterr().err.replace("│", " ").split())
    assert parse_train_ldm(["--data.source", str(tmp_path), *out, *cache_flags]).data.shuffle_tags is False
    on_the_fly = parse_train_ldm(["--data.source", str(tmp_path), "--data.shuffle-tags", "--data.keep-tags", "2", *out])
    assert on_the_fly.data.tag_shuffle() == TagShuffle(keep=2, separator=",")
