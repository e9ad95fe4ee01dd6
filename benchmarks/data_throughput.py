"""Images per second per core for reading shards: tar parsing, safe decode, resize, crop, to tensor.

    python benchmarks/data_throughput.py [--images 300] [--source-width 512] [--source-height 384]
    python benchmarks/data_throughput.py --mode buckets     # bucketed vs square loading, mixed shapes

Generates synthetic JPEG and PNG shards in a temporary folder (smooth photo-like content plus grain),
then runs the real training stream (`data.build_loader`, one process, no workers, one torch thread)
at 64 and 256 px with each resize filter. `--mode buckets` writes a JPEG folder of mixed shapes
(portrait, landscape, panorama, square, tiny), prints its SDXL bucket histogram and the header scan
time, and compares square crops with bucketed batches from the folder and from bucketed shards. "Per core" divides by the process's CPU time, which is
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
from typing import Literal

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
    mode: Literal["filters", "buckets", "all"] = "filters"
    """filters: square crops per filter and resolution; buckets: bucketed vs square on mixed shapes."""
    bucket_resolution: int = 256
    """Target side (pixel area resolution**2) of the bucket comparison."""


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


MIXED = {"portrait": (384, 512), "landscape": (512, 384), "panorama": (1024, 256), "square": (512, 512),
         "tiny": (48, 40)}
"""(W, H) of the bucket comparison's shapes, written in equal numbers."""


def write_mixed_folder(folder: Path, cfg: ThroughputConfig) -> str:
    folder.mkdir(parents=True)
    for i in range(cfg.images):
        kind = list(MIXED)[i % len(MIXED)]
        photo_like(i, *MIXED[kind]).save(folder / f"{kind}{i:05d}.jpg", quality=90)
        (folder / f"{kind}{i:05d}.txt").write_text(f"a {kind} image {i}")
    return str(folder)


def loader_rate(data_cfg: DataConfig, cfg: ThroughputConfig) -> tuple[float, float, float]:
    """(images per CPU-second, images per wall second, megapixels per wall second) after a warm-up."""
    loader = build_loader(data_cfg, batch_size=cfg.batch_size, seed=0)
    steps = max(1, cfg.images // cfg.batch_size)
    for _ in range(max(1, steps // 4)):
        next(loader)
    cpu, wall, pixels = time.process_time(), time.perf_counter(), 0
    for _ in range(steps):
        pixels += next(loader)["pixel_values"][0, 0].numel() * cfg.batch_size
    n, seconds = steps * cfg.batch_size, time.perf_counter() - wall
    return n / (time.process_time() - cpu), n / seconds, pixels / seconds / 1e6


def compare_buckets(tmp: Path, cfg: ThroughputConfig) -> None:
    from data.buckets import bucket_name, nearest_bucket, resolve_buckets
    from data.export import ExportConfig, write_shards as export_shards
    from data.records import open_records

    res = cfg.bucket_resolution
    folder = write_mixed_folder(tmp / "mixed", cfg)
    square = DataConfig(source=folder, resolution=res, crop="random", flip=True)
    bucketed = square.replace(buckets=("sdxl",))
    start = time.perf_counter()
    histogram = build_loader(bucketed, batch_size=cfg.batch_size, seed=0).bucket_histogram  # type: ignore[attr-defined]
    scan = time.perf_counter() - start
    buckets = resolve_buckets(("sdxl",), res)
    print(f"\nmixed shapes {', '.join(f'{k} {w}x{h}' for k, (w, h) in MIXED.items())}: {cfg.images} JPEGs")
    print(f"sdxl buckets at {res}**2 px: {len(buckets)}; assignment: "
          + ", ".join(f"{k} -> {bucket_name(buckets[nearest_bucket(buckets, h, w)])}" for k, (w, h) in MIXED.items()))
    print(f"bucket histogram (W x H: images): {histogram}; loader start incl. header scan {scan:.2f} s "
          f"({1e3 * scan / cfg.images:.2f} ms per image)")
    _, records = open_records(bucketed)
    export_shards(records, bucketed, ExportConfig("jpeg", 90, 1024, 100), tmp / "bucketed-shards")
    rows = [("folder, square crops", square), ("folder, buckets", bucketed),
            ("bucketed shards, buckets", bucketed.replace(source=str(tmp / "bucketed-shards")))]
    for label, data_cfg in rows:
        per_core, wall, mpix = loader_rate(data_cfg, cfg)
        print(f"{label:26s}: {per_core:7.1f} img/s per core ({wall:7.1f} wall, {mpix:5.2f} Mpx/s of batches)")


def main(args: list[str] | None = None) -> None:
    cfg = parse_config(ThroughputConfig, None, args)
    torch.set_num_threads(1)
    if cfg.mode != "filters":
        with tempfile.TemporaryDirectory() as tmp:
            compare_buckets(Path(tmp), cfg)
        if cfg.mode == "buckets":
            return
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
