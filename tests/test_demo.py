"""launch/demo.py: the labelled sample grid the demo ends with."""

from __future__ import annotations

import pytest
from PIL import Image

from launch.demo import DEMO_PROMPTS, labelled_samples


def test_labelled_samples_enlarges_in_prompt_order_and_refuses_a_short_folder(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for k, colour in enumerate(colours):  # names as ldm-generate writes them; 00010 sorts after 00002
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{k:05d}-seed{k}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")  # not a sample
    grid = labelled_samples(tmp_path, DEMO_PROMPTS[:4])
    cell_w, cell_h = grid.width // 2, grid.height // 2  # 4 images -> 2x2
    assert cell_w >= 64 and cell_h > 64  # 2x enlarged, a caption strip under each
    for k, colour in enumerate(colours):
        x, y = (k % 2) * cell_w + cell_w // 2, (k // 2) * cell_h + 32
        assert grid.getpixel((x, y)) == colour
    with pytest.raises(RuntimeError, match="expected 5 generated images"):
        labelled_samples(tmp_path, DEMO_PROMPTS[:5])
