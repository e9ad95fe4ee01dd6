"""The three sources (image folder, `datasets`, shards) give the same samples, and fail safely."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

import _data_fixtures as fx
from data import DataConfig, DataConfigError, iterate_once, open_records


def all_samples(source: str, **overrides) -> tuple[dict[str, dict], dict[str, int]]:
    cfg = DataConfig(source=source, resolution=16, max_bad_fraction=1.0, **overrides)
    loader = iterate_once(cfg, batch_size=64)
    samples = {}
    for batch in loader:
        for i, key in enumerate(batch["keys"]):
            samples[key] = {"caption": batch["captions"][i], "image": batch["pixel_values"][i],
                            "original_size": tuple(batch["original_sizes"][i].tolist())}
    return samples, loader.bad_sample_counts


def test_image_folder_with_sidecar_captions(tmp_path):
    captions = fx.make_image_folder(tmp_path, 6)
    (tmp_path / "img000.txt").unlink()
    samples, bad = all_samples(str(tmp_path))
    assert bad == {"missing_caption": 1}
    assert {k: s["caption"] for k, s in samples.items()} == {k: c for k, c in captions.items() if k != "img000"}
    assert samples["sub/img001"]["original_size"] == (40, 48)
    samples, bad = all_samples(str(tmp_path), missing_caption="empty")
    assert samples["img000"]["caption"] == "" and not bad


def test_image_folder_metadata_jsonl_with_lists_extra_columns_and_hostile_paths(tmp_path):
    for i in range(3):
        fx.textured(i).save(tmp_path / f"{i}.png")
    rows = [
        {"file_name": "0.png", "text": ["first", "second"], "source": "web"},
        {"file_name": "1.png", "text": "  "},
        {"file_name": "2.png"},
        {"file_name": "../../outside.png", "text": "escape"},
        {"file_name": "gone.png", "text": "missing file"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path.parent / "outside.png").write_bytes(fx.encode(fx.textured(9)))
    samples, bad = all_samples(str(tmp_path))
    assert samples["0"]["caption"] in ("first", "second") and samples["1"]["caption"] == ""
    assert bad == {"missing_caption": 1, "unsafe_path": 1, "missing_file": 1}
    _, records = open_records(DataConfig(source=str(tmp_path)))
    assert next(r for r in records if r.key == "0").metadata == {"source": "web"}


def test_image_folder_metadata_csv(tmp_path):
    (tmp_path / "a").mkdir()
    fx.textured(0).save(tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "metadata.csv").write_text("file_name,caption\nx.jpg,a csv caption\n")
    samples, _ = all_samples(str(tmp_path), caption_column="caption")
    assert list(samples) == ["a/x"] and samples["a/x"]["caption"] == "a csv caption"


def _image_dataset(n: int):
    import datasets

    rows = {"image": [fx.textured(i) for i in range(n)], "text": [f"caption {i}" for i in range(n)],
            "id": [f"row{i}" for i in range(n)], "score": [i / 10 for i in range(n)]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "id": datasets.Value("string"), "score": datasets.Value("float32")})
    return datasets.Dataset.from_dict(rows, features=features)


def test_datasets_save_to_disk_parquet_and_arrow_match_the_folder_samples(tmp_path):
    dataset = _image_dataset(4)
    dataset.save_to_disk(str(tmp_path / "disk"))
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "folder").mkdir()
    for i in range(4):
        fx.textured(i).save(tmp_path / "folder" / f"row{i}.png")
        (tmp_path / "folder" / f"row{i}.txt").write_text(f"caption {i}")
    reference, _ = all_samples(str(tmp_path / "folder"))
    disk, _ = all_samples(str(tmp_path / "disk"), key_column="id")
    parquet, _ = all_samples(str(tmp_path / "rows.parquet"), key_column="id", cache_dir=str(tmp_path / "cache"))
    arrow_file = str(next((tmp_path / "disk").glob("*.arrow")))
    arrow, _ = all_samples(arrow_file, key_column="id", cache_dir=str(tmp_path / "cache"))
    for samples in (disk, parquet, arrow):
        assert sorted(samples) == sorted(reference)
        for key, sample in samples.items():
            assert sample["caption"] == reference[key]["caption"]
            assert sample["image"].equal(reference[key]["image"])
    _, records = open_records(DataConfig(source=str(tmp_path / "disk")))
    assert next(records).metadata == {"id": "row0", "score": pytest.approx(0.0)}


def test_datasets_column_errors_name_the_columns(tmp_path):
    _image_dataset(2).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(DataConfigError, match="caption-column"):
        all_samples(str(tmp_path / "disk"), caption_column="prompt")


def test_shards_never_unpickle_and_keep_hostile_keys_as_strings(tmp_path):
    marker = tmp_path / fx.PICKLE_MARKER_NAME
    members = fx.good_members(0, 2) + [
        ("s00001.pyd", fx.pickle_payload(marker)), ("s00001.pkl", fx.pickle_payload(marker)),
        ("../../evil.png", fx.encode(fx.textured(5))), ("../../evil.txt", b"climbing out"),
    ]
    fx.write_tar(tmp_path / "shard.tar", members)
    samples, bad = all_samples(str(tmp_path / "shard.tar"))
    assert not marker.exists(), "a pickle member was unpickled"
    assert set(samples) == {"s00000", "s00001", "../../evil"} and not bad
    assert samples["../../evil"]["caption"] == "climbing out"
    assert not (tmp_path.parent.parent / "evil.png").exists()


def test_pipe_urls_need_the_explicit_flag(tmp_path):
    shard = fx.write_tar(tmp_path / "shard.tar", fx.good_members(0, 3))
    with pytest.raises(DataConfigError, match="pipe"):
        all_samples(f"pipe:cat {shard}")
    samples, _ = all_samples(f"pipe:cat {shard}", allow_pipe_urls=True)
    assert len(samples) == 3


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    shard = fx.write_tar(tmp_path / "shard.tar", fx.good_members(0, 6))
    data = shard.read_bytes()
    cut = data.index(b"s00004.txt")  # the header of sample 4's caption: its image was read, not its caption
    shard.write_bytes(data[: cut + 100])
    samples, bad = all_samples(str(shard))
    assert sorted(samples) == [f"s{i:05d}" for i in range(4)]
    assert bad == {"truncated_shard": 1}  # sample 4, incomplete at the cut, is part of that one
    data = shard.read_bytes()
    shard.write_bytes(data[: data.index(b"s00002.png") + 600])  # cut inside sample 2's image data
    samples, bad = all_samples(str(shard))
    assert sorted(samples) == ["s00000", "s00001"] and bad == {"truncated_shard": 1}


def test_gzipped_shards_bad_json_and_bad_images_are_counted(tmp_path):
    members = fx.good_members(0, 3) + [
        ("bad1.png", b"not a png at all"), ("bad1.txt", b"x"),
        ("bad2.png", fx.encode(fx.textured(1))), ("bad2.json", b"{not json"),
        ("ok3.png", fx.encode(fx.textured(2))), ("ok3.json", json.dumps({"text": ["a", "b"]}).encode()),
        ("bomb.png", fx.decompression_bomb(9000)), ("bomb.txt", b"boom"),
    ]
    plain = fx.write_tar(tmp_path / "raw.tar", members)
    (tmp_path / "shard.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    samples, bad = all_samples(str(tmp_path / "shard.tar.gz"))
    assert set(samples) == {"s00000", "s00001", "s00002", "ok3"} and samples["ok3"]["caption"] in ("a", "b")
    assert bad == {"not_an_image": 1, "bad_json": 1, "decompression_bomb": 1}


def test_unreadable_shard_is_a_counted_bad_sample(tmp_path):
    fx.write_tar(tmp_path / "good.tar", fx.good_members(0, 3))
    (tmp_path / "list.txt").write_text("good.tar\nhttps://127.0.0.1:9/missing.tar\n")
    samples, bad = all_samples(str(tmp_path / "list.txt"))
    assert len(samples) == 3 and sum(bad.values()) == 1


def test_all_sources_agree_on_pixels(tmp_path):
    """The same PNG read from a folder and from a shard gives the same tensor."""
    fx.make_image_folder(tmp_path / "folder", 3)
    fx.write_tar(tmp_path / "shard.tar", [
        (f"{'sub/' if i % 2 else ''}img{i:03d}.{ext}", data)
        for i in range(3)
        for ext, data in (("png", fx.encode(fx.textured(i))), ("txt", f"caption {i}".encode()))
    ])
    folder, _ = all_samples(str(tmp_path / "folder"))
    shards, _ = all_samples(str(tmp_path / "shard.tar"))
    assert sorted(folder) == sorted(shards)
    for key in folder:
        assert np.array_equal(folder[key]["image"].numpy(), shards[key]["image"].numpy())
