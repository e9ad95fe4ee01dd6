"""Sample grids reach the tracker: MetricsLogger.log_image writes tensorboard images (and wandb's when chosen)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

from launch.training.tracking import MetricsLogger


class MainProcess:
    is_main_process = True


def grid(path: Path) -> Path:
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:, :20] = (220, 30, 30)
    Image.fromarray(pixels).save(path)
    return path


def test_tensorboard_receives_the_sample_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    logger = MetricsLogger(MainProcess(), tmp_path, "tensorboard", "run", {})
    logger.log_image(250, "samples", grid(tmp_path / "g.png"))
    logger.log_image(500, "samples", grid(tmp_path / "g.png"))
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    images = events.Images("samples")
    assert [e.step for e in images] == [250, 500]
    assert (images[0].width, images[0].height) == (40, 24)


def test_wandb_receives_the_sample_grid(tmp_path, monkeypatch):
    logged = []
    run = types.SimpleNamespace(log=lambda values, step: logged.append((step, values)), finish=lambda: None)
    fake = types.SimpleNamespace(init=lambda **kw: run, Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(MainProcess(), tmp_path, "wandb", "run", {})
    logger.log_image(8, "samples", grid(tmp_path / "g.png"))
    logger.close()
    assert logged == [(8, {"samples": ("image", str(tmp_path / "g.png"))})]
