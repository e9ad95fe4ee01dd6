"""launch/prepare_data.py: sources round-trip into shards, --validate, the emoji set (offline)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _data_fixtures as fx
from data import DataConfig, build_loader, open_records
from data import emoji as emoji_set
from launch import prepare_data



def shard_contents(folder: Path) -> dict[str, dict]:
    """key -> decoded RGB pixels, caption and metadata, read back through the data layer."""
    _, records = open_records(DataConfig(source=str(folder)))
    out = {}
    for record in records:
        assert record.problem is None, record.problem
        out[record.key] = {"pixels": np.asarray(Image.open(io.BytesIO(record.image)).convert("RGB")),
                           "caption": record.caption.decode() if isinstance(record.caption, bytes) else record.caption,
                           "metadata": record.metadata}
    return out


def test_folder_round_trips_into_shards_and_a_rerun_does_nothing(tmp_path):
    captions = fx.make_image_folder(tmp_path / "folder", 7)
    out = tmp_path / "shards"
    stats = prepare_data.main(["--data", str(tmp_path / "folder"), "--out", str(out), "--samples-per-shard", "3"])
    assert stats["samples_written"] == 7 and [s["samples"] for s in stats["shards"]] == [3, 3, 1]
    contents = shard_contents(out)
    assert {k: v["caption"] for k, v in contents.items()} == captions
    for key, sample in contents.items():
        original = np.asarray(Image.open(tmp_path / "folder" / f"{key}.png").convert("RGB"))
        assert np.array_equal(sample["pixels"], original), key  # PNG: exact
        assert sample["metadata"]["original_size"] == [40, 48]
    assert json.loads((out / "config.json").read_text())["data"]["source"] == str(tmp_path / "folder")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare_data.main(["--data", str(tmp_path / "folder"), "--out", str(out), "--samples-per-shard", "3"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_save_to_disk_dataset_round_trips_with_metadata_and_list_captions(tmp_path):
    import datasets

    images = [fx.textured(i, (30 + i, 20)) for i in range(4)]
    rows = {"image": images, "text": [["a", "b"], ["one"], ["   "], []], "id": [f"r.{i}" for i in range(4)],
            "score": [0.5, 1.5, 2.5, 3.5]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string")),
                                  "id": datasets.Value("string"), "score": datasets.Value("float32")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "disk"))
    out = tmp_path / "shards"
    stats = prepare_data.main(["--data", str(tmp_path / "disk"), "--data.key-column", "id", "--out", str(out)])
    assert stats["skipped"] == {"missing_caption": 1} and stats["samples_written"] == 3
    contents = shard_contents(out)
    assert sorted(contents) == ["r_0", "r_1", "r_2"]  # keys made safe: no dots in shard keys
    # list captions stay lists (the loader picks one per epoch); an empty list is a missing caption
    assert contents["r_0"]["caption"] == ["a", "b"] and contents["r_1"]["caption"] == ["one"]
    assert contents["r_2"]["caption"] == [""]
    assert contents["r_1"]["metadata"]["score"] == 1.5 and contents["r_1"]["metadata"]["id"] == "r.1"
    for i in range(3):
        assert np.array_equal(contents[f"r_{i}"]["pixels"], np.asarray(images[i]))


def test_large_images_are_downscaled_and_keep_their_original_size(tmp_path):
    (tmp_path / "folder").mkdir()
    fx.textured(0, (200, 100)).save(tmp_path / "folder" / "big.png")
    (tmp_path / "folder" / "big.txt").write_text("big")
    out = tmp_path / "shards"
    prepare_data.main(["--data", str(tmp_path / "folder"), "--out", str(out), "--max-side", "64",
                       "--image-format", "jpeg"])
    contents = shard_contents(out)
    assert contents["big"]["pixels"].shape == (32, 64, 3)
    assert contents["big"]["metadata"]["original_size"] == [100, 200]


def test_validate_reports_every_bad_sample_and_writes_nothing(tmp_path, capsys):
    fx.make_image_folder(tmp_path / "folder", 3)
    (tmp_path / "folder" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "folder" / "broken.txt").write_text("x")
    (tmp_path / "folder" / "bomb.png").write_bytes(fx.decompression_bomb(9000))
    (tmp_path / "folder" / "bomb.txt").write_text("x")
    before = sorted(p.name for p in (tmp_path / "folder").iterdir())
    summary = prepare_data.main(["--data", str(tmp_path / "folder"), "--validate"])
    printed = capsys.readouterr()
    assert "not_an_image\tbroken" in printed.out + printed.err
    assert "decompression_bomb\tbomb" in printed.out + printed.err
    assert summary["samples_usable"] == 3 and summary["skipped"] == {"decompression_bomb": 1, "not_an_image": 1}
    assert json.loads(printed.out[printed.out.index("{"):]) == summary
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == before


def fake_emoji_package(path: Path) -> Path:
    """A tiny stand-in for the npm tarball: 12 base emoji, one with skin tones, RGBA PNGs."""
    entries = []
    for n in range(12):
        entry = {"name": f"TEST FACE {n}", "unified": f"1F6{n:02d}", "image": f"1f6{n:02d}.png", "sort_order": n,
                 "short_name": f"t{n}", "short_names": [f"t{n}"], "category": "Smileys", "subcategory": "face",
                 "has_img_google": True}
        if n == 9:
            entry["skin_variations"] = {
                "1F3FD": {"unified": "1F609-1F3FD", "image": "1f609-1f3fd.png", "has_img_google": True},
                "1F3FB-1F3FF": {"unified": "1F609-1F3FB-1F3FF", "image": "1f609-1f3fb-1f3ff.png", "has_img_google": True},
            }
        entries.append(entry)
    members = [("package/emoji.json", json.dumps(entries).encode())]
    names = [e["image"] for e in entries] + ["1f609-1f3fd.png", "1f609-1f3fb-1f3ff.png"]
    for i, name in enumerate(names):
        members.append((emoji_set.IMAGE_FOLDER + name, fx.encode(fx.solid((*fx.distinct_color(i), 0), (64, 64), "RGBA"))))
    return fx.write_tar(path, members, mode="w:gz")


def test_emoji_captions_and_a_leak_free_validation_split(tmp_path):
    package = emoji_set.read_package(fake_emoji_package(tmp_path / "e.tgz"))
    train, val = emoji_set.emoji_records(*package)
    assert len(train) == 11 and len(val) == 3  # base emoji 9 (the 10th) and both its variants
    assert sorted(r.caption for r in val) == [
        "test face 9", "test face 9: light skin tone, dark skin tone", "test face 9: medium skin tone"]
    assert val[0].metadata["category"] == "Smileys" and val[1].metadata["subcategory"] == "face"
    # A showcase emoji due for validation stays in training; the next base emoji is held out instead.
    train, val = emoji_set.emoji_records(*package, keep_in_train=frozenset({"1F609"}))
    assert [r.caption for r in val] == ["test face 10"] and len(train) == 13
    assert {"test face 9", "test face 9: medium skin tone"} <= {r.caption for r in train}


def test_emoji_download_is_verified_against_the_published_integrity(tmp_path):
    package = fake_emoji_package(tmp_path / "e.tgz")
    url, good = package.as_uri(), emoji_set.integrity_of(package.read_bytes())
    with pytest.raises(RuntimeError, match="tampered"):
        emoji_set.fetch_tarball(tmp_path / "downloads", url=url, integrity="sha512-AAAA")
    assert not (tmp_path / "downloads" / "e.tgz").exists()
    cached = emoji_set.fetch_tarball(tmp_path / "downloads", url=url, integrity=good)
    assert cached.read_bytes() == package.read_bytes()


def test_emoji_prepare_writes_white_backed_train_and_val_shards(tmp_path, monkeypatch):
    package = fake_emoji_package(tmp_path / "e.tgz")
    monkeypatch.setattr(emoji_set, "fetch_tarball", lambda download_dir: package)
    stats = prepare_data.main(["--emoji", str(tmp_path / "emoji")])
    assert stats["train"]["samples_written"] == 11 and stats["val"]["samples_written"] == 3
    contents = shard_contents(tmp_path / "emoji" / "val")
    assert all((sample["pixels"] == 255).all() for sample in contents.values()), "transparent must be white"
    assert prepare_data.main(["--emoji", str(tmp_path / "emoji")])["seconds"] == stats["seconds"]  # reused


def test_emoji_caption_variants_keep_the_name_first_and_drop_duplicates():
    heart = {"name": "HEAVY BLACK HEART", "short_names": ["heart"], "category": "Smileys & Emotion", "subcategory": "heart"}
    assert emoji_set.caption_variants(heart) == ["heavy black heart", "heart", "heavy black heart, heart, smileys & emotion"]
    flag = {"name": "Japan Flag", "short_names": ["jp", "flag-jp"], "category": "Flags", "subcategory": "country-flag"}
    assert emoji_set.caption_variants(flag) == ["japan flag", "flag: japan", "jp", "flag jp", "japan flag, country flag, flags"]
    wave = {"name": "WAVING HAND SIGN", "short_names": ["wave", "waving_hand_sign"], "category": "People & Body",
            "subcategory": "hand-fingers-open"}
    assert emoji_set.caption_variants(wave, "medium skin tone") == [  # "waving hand sign" twice: kept once
        "waving hand sign: medium skin tone", "wave: medium skin tone",
        "waving hand sign: medium skin tone, hand fingers open, people & body"]
    with pytest.raises(ValueError, match="captions='tags' must be one of name, variants"):
        emoji_set.emoji_records([], {}, captions="tags")


def test_emoji_prepare_with_caption_variants_stores_lists_the_loader_picks_from_per_epoch(tmp_path, monkeypatch):
    package = fake_emoji_package(tmp_path / "e.tgz")
    monkeypatch.setattr(emoji_set, "fetch_tarball", lambda download_dir: package)
    plain, rich = tmp_path / "plain", tmp_path / "rich"
    prepare_data.main(["--emoji", str(plain)])
    stats = prepare_data.main(["--emoji", str(rich), "--emoji-captions", "variants"])
    assert "emoji_captions" not in json.loads((plain / "stats.json").read_text())["settings"]  # older folders stay complete
    assert stats["settings"]["emoji_captions"] == "variants" and stats["train"]["samples_written"] == 11
    before, after = shard_contents(plain / "train"), shard_contents(rich / "train")
    assert after["1f600"]["caption"] == ["test face 0", "t0", "test face 0, face, smileys"]
    assert {k: v["caption"][0] for k, v in after.items()} == {k: v["caption"] for k, v in before.items()}
    assert {k: v["metadata"] for k, v in after.items()} == {k: {**v["metadata"], "text": after[k]["caption"]}
                                                            for k, v in before.items()}
    # Validation keeps the names (a held-out loss comparable with and without variants) ...
    assert {k: v["caption"] for k, v in shard_contents(rich / "val").items()} == \
        {k: v["caption"] for k, v in shard_contents(plain / "val").items()}
    # ... training draws one of the variants per epoch.
    loader = build_loader(DataConfig(source=str(rich / "train"), resolution=32), batch_size=11, seed=0)
    seen = [c for _, batch in zip(range(6), loader) for c in batch["captions"]]
    allowed = {c for v in after.values() for c in v["caption"]}
    assert set(seen) <= allowed and len(set(seen)) > 11 + 3, sorted(set(seen))
    # Switching the option rewrites the folder instead of reusing it.
    again = prepare_data.main(["--emoji", str(plain), "--emoji-captions", "variants"])
    assert isinstance(shard_contents(plain / "train")["1f600"]["caption"], list) and again["seconds"] >= 0


def test_validate_and_prepare_name_shard_problems_by_their_real_reason(tmp_path, capsys):
    """A truncated shard and a key with two images are not "missing_caption" (the record's own
    problem is reported before its caption is looked at)."""
    shards = tmp_path / "shards"
    duplicate = [("dup00.png", fx.encode(fx.textured(0))), ("dup00.png", fx.encode(fx.textured(1))),
                 ("dup00.txt", b"two images, one key")]
    fx.write_tar(shards / "shard-000000.tar", fx.good_members(0, 2) + duplicate)
    cut = fx.write_tar(shards / "shard-000001.tar", fx.good_members(10, 3))
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"s00012.png") + 600])  # inside the last sample's image
    summary = prepare_data.main(["--data", str(shards), "--validate"])
    printed = capsys.readouterr().out
    assert summary["skipped"] == {"duplicate_member": 1, "truncated_shard": 1}, summary
    assert "duplicate_member\tdup00" in printed and "truncated_shard\ts00012" in printed
    assert summary["samples_usable"] == 4
    stats = prepare_data.main(["--data", str(shards), "--out", str(tmp_path / "out")])
    assert stats["skipped"] == {"duplicate_member": 1, "truncated_shard": 1}
