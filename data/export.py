"""Writing any source as webdataset shards (and checking a source without writing).

Each sample becomes `KEY.png` or `KEY.jpg` (decoded safely, transparency composited, longer side at
most `max_side`, re-encoded), `KEY.txt` (the caption; a list-valued caption goes into the .json under
`caption_column` instead) and `KEY.json` (`original_size` [H, W] of the source image plus every
metadata column). Keys are made safe (data/keys.py). Shards are written to a temporary name and
renamed when complete; `stats.json` is written last, so a folder with it is complete. With
`--data.buckets`, each shard holds one bucket, named in the file (`shard-b512x768-000000.tar`), so
the loader can draw a batch of one bucket on every process without reading shards out of order.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from webdataset import TarWriter

from foundation import write_json_atomic
from data.buckets import nearest_bucket, resolve_buckets, shard_tag
from data.captions import caption_text
from data.config import DataConfig
from data.decode import BadSample
from data.keys import shard_key
from data.sample import RawRecord, decode_record

SHARD_PATTERN = "shard-{:06d}.tar"
OUR_SHARD = re.compile(r"^shard-(b\d+x\d+-)?\d{6}\.tar(\.tmp)?$")


@dataclass(frozen=True)
class ExportConfig:
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = 95
    max_side: int = 512
    samples_per_shard: int = 1000


@dataclass
class ExportStats:
    """What happened to every record: written, or skipped by reason (with a few example keys)."""

    source: str
    samples_seen: int = 0
    samples_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_sample(record: RawRecord, cfg: DataConfig, export: ExportConfig) -> dict[str, bytes]:
    """One record -> shard members {ext: bytes}; raises BadSample like the training loader would."""
    raise_known_problem(record)
    caption = _stored_caption(record.caption, cfg)
    img, original_size = decode_record(record, cfg)
    if max(img.size) > export.max_side:
        scale = export.max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    if export.image_format == "png":
        img.save(buffer, "PNG")
    else:
        img.save(buffer, "JPEG", quality=export.jpeg_quality)
    metadata = {**record.metadata, "original_size": list(original_size)}
    members = {"png" if export.image_format == "png" else "jpg": buffer.getvalue()}
    if isinstance(caption, list):
        metadata[cfg.caption_column] = caption
    else:
        members["txt"] = caption.encode("utf-8")
    members["json"] = json.dumps(metadata, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return members


def raise_known_problem(record: RawRecord) -> None:
    """A record that came with its own problem (truncated shard, duplicate member, missing file...) is
    reported by that reason, before its (absent) caption could be blamed."""
    if record.problem is not None:
        raise BadSample(*record.problem)


def _stored_caption(raw: object, cfg: DataConfig) -> str | list[str]:
    """The caption as it will be stored: lists kept whole (the loader picks per epoch)."""
    if isinstance(raw, (list, tuple)) and raw:
        return [caption_text(c) for c in raw]
    if raw is None or isinstance(raw, (list, tuple)):
        if cfg.missing_caption == "skip":
            raise BadSample("missing_caption", "no caption (set --data.missing-caption empty to keep it)")
        return ""
    return caption_text(raw)


class ShardSink:
    """Writes members into numbered shards of `samples_per_shard`, each renamed into place when full."""

    def __init__(self, out_dir: Path, samples_per_shard: int, pattern: str = SHARD_PATTERN,
                 keys: set[str] | None = None) -> None:
        self.out_dir, self.samples_per_shard, self.pattern = out_dir, samples_per_shard, pattern
        self.shards: list[dict[str, Any]] = []
        self.keys: set[str] = set() if keys is None else keys  # shared by the sinks of one folder
        self._writer: TarWriter | None = None
        self._count = 0

    def write(self, key: str, members: dict[str, bytes]) -> str:
        if self._writer is None or self._count == self.samples_per_shard:
            self._finish_shard()
            self._open_shard()
        key = self._unique(shard_key(key))
        self._writer.write({"__key__": key, **members})  # type: ignore[union-attr]
        self._count += 1
        return key

    def _unique(self, key: str) -> str:
        candidate, n = key, 1
        while candidate in self.keys:
            candidate, n = f"{key}_{n}", n + 1
        self.keys.add(candidate)
        return candidate

    def _open_shard(self) -> None:
        name = self.pattern.format(len(self.shards))
        self._path = self.out_dir / name
        self._writer = TarWriter(str(self._path) + ".tmp", encoder=False, mtime=0)
        self._count = 0

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(str(self._path) + ".tmp", self._path)
        self.shards.append({"name": self._path.name, "samples": self._count})
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._finish_shard()
        return self.shards


def write_shards(records: Iterable[RawRecord], cfg: DataConfig, export: ExportConfig, out_dir: Path,
                 progress: Any = None) -> ExportStats:
    """Convert records into shards in `out_dir` (stale shard files of ours are removed first)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_shards(out_dir)
    stats = ExportStats(source=cfg.source)
    buckets = resolve_buckets(cfg.buckets, cfg.resolution) if cfg.buckets else []
    keys: set[str] = set()
    sinks: dict[int, ShardSink] = {}
    for record in _counted(records, stats, progress):
        try:
            members = export_sample(record, cfg, export)
        except BadSample as e:
            stats.skip(e.reason, f"{record.key} in {record.origin}: {e.message}")
            continue
        # With buckets, one bucket per shard (the loader cannot sort a shard's samples by bucket).
        b = nearest_bucket(buckets, *json.loads(members["json"])["original_size"]) if buckets else -1
        if b not in sinks:
            pattern = SHARD_PATTERN if b < 0 else "shard-" + shard_tag(buckets[b]) + "-{:06d}.tar"
            sinks[b] = ShardSink(out_dir, export.samples_per_shard, pattern, keys)
        sinks[b].write(record.key, members)
        stats.samples_written += 1
    stats.shards = [shard for b in sorted(sinks) for shard in sinks[b].close()]
    return stats


def validate_records(records: Iterable[RawRecord], cfg: DataConfig, progress: Any = None,
                     report: Any = None) -> ExportStats:
    """Decode everything as prepare would, write nothing; `report(reason, key, origin, message)` per bad one."""
    stats = ExportStats(source=cfg.source)
    for record in _counted(records, stats, progress):
        try:
            raise_known_problem(record)
            _stored_caption(record.caption, cfg)
            decode_record(record, cfg)
        except BadSample as e:
            stats.skip(e.reason, f"{record.key} in {record.origin}: {e.message}")
            if report is not None:
                report(e.reason, record.key, record.origin, e.message)
            continue
        stats.samples_written += 1  # "usable" in a validation report
    return stats


def _counted(records: Iterable[RawRecord], stats: ExportStats, progress: Any) -> Iterator[RawRecord]:
    for record in records:
        stats.samples_seen += 1
        if progress is not None:
            progress.update(1)
        yield record


def remove_shards(out_dir: Path) -> None:
    """Delete only files this module writes (shard-NNNNNN.tar, shard-bWxH-NNNNNN.tar, their .tmp)."""
    for path in out_dir.glob("shard-*.tar*"):
        if OUR_SHARD.match(path.name):
            path.unlink()


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    """Written last and atomically: its presence with complete=true marks a finished folder."""
    write_json_atomic(path, {**stats, "complete": True})
