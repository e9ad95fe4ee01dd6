"""Bucketed stage-3 training: the sample grids show a few bucket shapes, each titled with its WxH,
generated through the pipeline call users make (`height=`, `width=`); held-out loss over buckets."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import _data_fixtures as fx
from launch.evaluation.pictures import titled_blocks
from launch.training.ldm_stage import sample_grid_shapes

# (W, H) buckets; portrait 96x160 -> 64x128, landscape 160x96 and panorama 320x64 -> 128x64, square -> 64x64
BUCKETS = ("64x64", "128x64", "64x128")
COUNTS = {"portrait": 3, "landscape": 4, "panorama": 2, "square": 3}


def test_grid_shapes_are_most_common_squarest_widest_tallest_each_once():
    buckets = [(64, 256), (128, 192), (128, 128), (192, 128), (256, 64)]  # sorted by W / H, as resolve_buckets
    histogram = {"128x192": 6, "192x128": 9, "256x64": 3, "128x128": 8}  # nothing in 64x256
    assert sample_grid_shapes(buckets, histogram) == [
        ((192, 128), "most common, 35% of images"), ((128, 128), "squarest, 31% of images"),
        ((256, 64), "widest, 12% of images"), ((128, 192), "tallest, 23% of images")]
    assert sample_grid_shapes(buckets) == [((128, 128), "squarest"), ((256, 64), "widest"), ((64, 256), "tallest")]
    assert sample_grid_shapes([(128, 128)], {"128x128": 5}) == [((128, 128), "most common, squarest, widest, "
                                                                             "tallest, 100% of images")]


def test_titled_blocks_stack_grids_of_different_sizes():
    blocks = [("64x128", Image.new("RGB", (70, 140), (255, 0, 0))), ("128x64", Image.new("RGB", (200, 70), (0, 0, 255)))]
    out = titled_blocks(blocks, title_height=16, pad=2)
    assert out.size == (200, 16 + 140 + 2 + 16 + 70 + 2)
    assert out.getpixel((10, 16 + 10)) == (255, 0, 0) and out.getpixel((150, 16 + 142 + 16 + 10)) == (0, 0, 255)
    assert out.getpixel((150, 16 + 10)) == (255, 255, 255)  # the narrower block leaves white beside it
    long_title = titled_blocks([("x" * 50, Image.new("RGB", (20, 20)))], pad=2)
    assert long_title.width == 50 * 6 + 4, "a title must fit, not be cut"
    with pytest.raises(ValueError):
        titled_blocks([])


@pytest.mark.slow
def test_bucketed_run_samples_each_grid_shape_through_the_pipeline(tiny_autoencoder, tmp_path, monkeypatch):
    from launch.train_ldm import main
    from ldm.pipeline import LatentDiffusionPipeline

    data = tmp_path / "mixed"
    fx.make_mixed_shape_folder(data, COUNTS)
    calls = []
    generate = LatentDiffusionPipeline.generate

    def spy(self, prompts, **kw):
        out = generate(self, prompts, **kw)
        calls.append(((kw.get("width"), kw.get("height")), {r.image.size for r in out}))
        return out

    monkeypatch.setattr(LatentDiffusionPipeline, "generate", spy)
    out = tmp_path / "run"
    main(["--preset", "tiny", "--data.source", str(data), "--data.buckets", *BUCKETS, "--val-data", str(data),
          "--vae", str(tiny_autoencoder), "--text-encoder", "minilm", "--run.output-dir", str(out),
          "--run.max-steps", "4", "--sample-every", "4", "--val-every", "4", "--run.report-to", "tensorboard"])
    shapes = [(128, 64), (64, 64), (64, 128)]  # most common + widest, squarest, tallest
    assert calls == [(s, {s}) for s in shapes for _ in range(2)], calls  # 2 guidance scales per shape
    grid = Image.open(out / "samples.png")
    assert grid.width >= 128 and grid.height > 64 + 64 + 128  # three blocks, one above the other
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records), "no held-out loss over the bucketed validation set"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "the grid went to no tracker"
