"""Pictures people would rather look at than read: image grids and loss curves (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

CHAR_PX = 6
"""Width of one character of PIL's default bitmap font, for fitting labels."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(images: Sequence[Image.Image] | np.ndarray, ncol: int, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile equally sized images into rows of ``ncol``."""
    tiles = [Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in images]
    if not tiles:
        raise ValueError("grid() needs at least one image")
    w, h = tiles[0].size
    nrow = math.ceil(len(tiles) / ncol)
    out = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), background)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        out.paste(tile.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return out


def reconstruction_grid(inputs: torch.Tensor, recon: torch.Tensor, upscale: int = 2) -> Image.Image:
    """Rows of (input | reconstruction | 4x amplified absolute difference)."""
    diff = ((recon - inputs).abs() * 4 - 1).clamp(-1, 1)  # 0 error -> black
    rows = []
    for a, b, d in zip(to_uint8(inputs), to_uint8(recon), to_uint8(diff)):
        rows.extend([a, b, d])
    img = grid(rows, ncol=3 * min(4, len(inputs)) if len(inputs) > 4 else 3)
    return img.resize((img.width * upscale, img.height * upscale), Image.NEAREST) if upscale > 1 else img


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str], ncol: int, label_height: int = 14) -> Image.Image:
    """A grid with a short caption under each image (prompts, guidance scales)."""
    w, h = images[0].size
    cells = []
    for im, text in zip(images, labels):
        cell = Image.new("RGB", (max(w, 96), h + label_height), (255, 255, 255))
        cell.paste(im.convert("RGB"), ((cell.width - w) // 2, 0))
        ImageDraw.Draw(cell).text((2, h + 1), _fit(text, cell.width), fill=(0, 0, 0))
        cells.append(cell)
    return grid(cells, ncol=ncol)


def titled_blocks(blocks: Sequence[tuple[str, Image.Image]], title_height: int = 16, pad: int = 2) -> Image.Image:
    """Grids of different sizes stacked top to bottom, each under a one-line title (e.g. "512x768 ..."),
    as wide as the widest grid or title."""
    if not blocks:
        raise ValueError("titled_blocks() needs at least one block")
    width = max(max(im.width for _, im in blocks), max(len(t) for t, _ in blocks) * CHAR_PX + 2 * pad)
    height = sum(title_height + im.height + pad for _, im in blocks)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw, y = ImageDraw.Draw(out), 0
    for title, im in blocks:
        draw.text((pad, y + 2), _fit(title, width), fill=(0, 0, 0))
        out.paste(im.convert("RGB"), (0, y + title_height))
        y += title_height + im.height + pad
    return out


def _fit(text: str, width_px: int, char_px: int = CHAR_PX) -> str:
    limit = max(4, width_px // char_px)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_curves(records: Iterable[dict], keys: Sequence[str], out: Path, title: str, kind: str | None = None) -> Path | None:
    """Plot ``keys`` of metrics.jsonl records against step; one panel per key. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if kind is None or r.get("kind") == kind]
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.startswith("loss") and min(ys) > 0:
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
