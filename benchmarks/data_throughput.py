"""Images per second per core for reading shards: tar parsing, safe decode, resize, crop, to tensor.

    python benchmarks/data_throughput.py [--images 300] [--source-width 512] [--source-height 384]

Generates synthetic JPEG and PNG shards in a temporary folder (smooth photo-like content plus grain),
then runs the real training stream (`data.build_loader`, one process, no workers, one torch thread)
at 64 and 256 px with each resize filter. "Per core" divides by the process's CPU time, which is
fairer than wall time on a shared machine (but still slower there: caches and cores are shared).
Prints numbers, asserts nothing.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from webdataset import TarWriter

from data import DataConfig, build_loader
from ldm.cli import parse_config


@dataclass(frozen=True)
class ThroughputConfig:
    """Decode + crop throughput of the data layer on synthetic shards."""

    images: int = 300
    """Images per shard set (each run reads them about twice: warm-up, then timed)."""
    source_width: int = 512
    source_height: int = 384
    resolutions: tuple[int, ...] = (64, 256)
    filters: tuple[str, ...] = ("bicubic", "bilinear")
    """Resize filters to compare (DataConfig.resample)."""
    batch_size: int = 32


def photo_like(i: int, width: int, height: int) -> Image.Image:
    """Smooth gradients and blobs plus sensor-like grain: compresses and decodes like a photo."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(128 + 100 * np.sin(x * fx + phase) * np.cos(y * fy))
    pixels = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_shards(folder: Path, fmt: str, cfg: ThroughputConfig) -> str:
    folder.mkdir(parents=True)
    per_shard = 100
    for s in range(0, cfg.images, per_shard):
        with TarWriter(str(folder / f"shard-{s // per_shard:06d}.tar"), encoder=False) as writer:
            for i in range(s, min(s + per_shard, cfg.images)):
                buffer = io.BytesIO()
                image = photo_like(i, cfg.source_width, cfg.source_height)
                image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                ext = "jpg" if fmt == "JPEG" else "png"
                writer.write({"__key__": f"img{i:06d}", ext: buffer.getvalue(), "txt": f"image {i}".encode()})
    return str(folder)


def images_per_second(spec: str, resolution: int, resample: str, cfg: ThroughputConfig) -> tuple[float, float]:
    """(images per CPU-second of this process, images per wall-clock second)."""
    data_cfg = DataConfig(source=spec, resolution=resolution, crop="random", flip=True, resample=resample)  # type: ignore[arg-type]
    loader = build_loader(data_cfg, batch_size=cfg.batch_size, seed=0)
    steps = max(1, cfg.images // cfg.batch_size)
    for _ in range(max(1, steps // 4)):  # warm-up: page cache, lazy imports
        next(loader)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        next(loader)
    n = steps * cfg.batch_size
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def bare_pil_per_core(spec: str, resolution: int, resample: str) -> float:
    """Reference: PIL alone decoding (with draft) and resizing (PIL filter) the first shard's images
    in a loop: no tar, no checks, no tensor. What a plain PIL pipeline would get at best."""
    from data.shards import iter_shard_records

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    images = [r.image for r in iter_shard_records(sorted(Path(spec).glob("*.tar"))[0].as_posix(), DataConfig())][:50]
    cpu = time.process_time()
    for data in images * 2:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (resolution, resolution))
        scale = resolution / min(img.size)
        img.resize((resolution, resolution), filters[resample], box=(0, 0, resolution / scale, resolution / scale))
    return 2 * len(images) / (time.process_time() - cpu)


def main(args: list[str] | None = None) -> None:
    cfg = parse_config(ThroughputConfig, None, args)
    torch.set_num_threads(1)
    print(f"source images {cfg.source_width}x{cfg.source_height}, {cfg.images} per format, 1 process, 1 thread")
    print("per core = images per CPU-second of the process; wall = per elapsed second (lower on a busy machine)")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("JPEG", "PNG"):
            spec = write_shards(Path(tmp) / fmt.lower(), fmt, cfg)
            for resolution in cfg.resolutions:
                for resample in cfg.filters:
                    per_core, wall = images_per_second(spec, resolution, resample, cfg)
                    ceiling = bare_pil_per_core(spec, resolution, resample)
                    print(f"{fmt:5s} -> {resolution:4d} px {resample:9s}: {per_core:7.1f} img/s per core "
                          f"({wall:7.1f} wall; bare PIL decode+resize: {ceiling:7.1f})")


if __name__ == "__main__":
    main()
