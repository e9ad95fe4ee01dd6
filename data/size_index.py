"""Image sizes without decoding pixels, for bucket assignment before training starts.

- image folders: each file's header (PIL opens lazily: a few hundred bytes read per image);
- `datasets`: each row's image bytes are read and their header parsed (one pass over the data;
  for large sets, `prepare_data --data.buckets ...` into bucketed shards once instead);
- shards: a shard cannot be read out of order, so shards are assigned at prepare time:
  `prepare_data --data.buckets ...` writes one bucket per shard (`shard-b512x768-000000.tar`),
  and the loader counts each shard's samples from the `stats.json` that prepare_data wrote
  beside them (or, for local shards without one, from the tar headers).
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

from PIL import Image
from webdataset.tariterators import base_plus_ext

from data.config import DataConfig
from data.decode import BadSample, _displayed_size, open_image
from data.shards import shard_name
from data.stream import MapSource

logger = logging.getLogger("data")


def image_sizes(source: MapSource, cfg: DataConfig) -> list[tuple[int, int] | None]:
    """(H, W) as displayed of every record of `source`; None where the header is unreadable (the
    record becomes a counted bad sample when it is drawn)."""
    folder_path = getattr(source, "image_path", None)
    sizes: list[tuple[int, int] | None] = []
    for index in range(len(source)):
        try:
            if folder_path is not None:
                path = folder_path(index)
                if path is None:
                    sizes.append(None)
                    continue
                with Image.open(path, formats=list(cfg.image_formats)) as img:
                    _check_pixels(img, cfg)
                    sizes.append(_displayed_size(img))
            else:
                data = source.record(index).image
                sizes.append(None if data is None else _displayed_size(
                    open_image(data, formats=cfg.image_formats, max_pixels=cfg.max_image_pixels)))
        except (BadSample, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            sizes.append(None)
    return sizes


def _check_pixels(img: Image.Image, cfg: DataConfig) -> None:
    if img.size[0] * img.size[1] > cfg.max_image_pixels:
        raise BadSample("decompression_bomb", "over max_image_pixels")


def shard_sample_counts(locations: tuple[str, ...]) -> list[int]:
    """Samples per shard: from a prepare_data stats.json beside the shards, else the tar headers of
    local shards; remote shards without a stats.json count as the mean of the others (or 1000)."""
    known: dict[str, int] = {}
    for folder in {str(Path(loc).parent) for loc in locations if "://" not in loc}:
        known.update(_stats_counts(Path(folder)))
    counts: list[int | None] = []
    for loc in locations:
        name = shard_name(loc)
        if name in known:
            counts.append(known[name])
        elif "://" not in loc and Path(loc).is_file() and not loc.endswith(("gz", "tgz")):
            counts.append(_count_keys(Path(loc)))
        else:
            counts.append(None)
    seen = [c for c in counts if c is not None]
    if len(seen) < len(counts):
        logger.warning("%d shard(s) have no stats.json entry and cannot be counted locally: assuming equal "
                       "sizes for the batch schedule.", len(counts) - len(seen))
    fill = round(sum(seen) / len(seen)) if seen else 1000
    return [fill if c is None else c for c in counts]


def _stats_counts(folder: Path) -> dict[str, int]:
    for candidate in (folder / "stats.json", folder.parent / "stats.json"):
        try:
            stats = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        tables = [stats] + [v for v in stats.values() if isinstance(v, dict)] if isinstance(stats, dict) else []
        found = {str(s["name"]): int(s["samples"]) for t in tables for s in t.get("shards", [])
                 if isinstance(s, dict) and "name" in s and "samples" in s}
        if found:
            return found
    return {}


def _count_keys(path: Path) -> int:
    """Distinct sample keys of a local, uncompressed tar, from its headers (member data is skipped)."""
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, _ = base_plus_ext(info.name)
                if info.isreg() and key is not None:
                    keys.add(key)
    except (tarfile.TarError, OSError):
        pass
    return len(keys)
