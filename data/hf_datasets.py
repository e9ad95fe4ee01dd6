"""A Hugging Face `datasets` dataset as a source: save_to_disk folders, parquet/arrow files, the hub.

Images are read undecoded (the image column is cast to `Image(decode=False)`), so our own safe
decoder sees the bytes: `datasets` would open any format PIL knows and has no pixel limit of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.config import DataConfig, DataConfigError
from data.sample import RawRecord
from data.spec import SourceSpec


class HFDatasetSource:
    """Map-style: `len(source)` rows, `source.record(i)` returns the row's image bytes and caption."""

    def __init__(self, spec: SourceSpec, cfg: DataConfig) -> None:
        import datasets

        self.cfg = cfg
        self.name = spec.spec
        dataset = _load(spec, cfg)
        _check_columns(dataset, cfg, spec.spec)
        feature = dataset.features[cfg.image_column]
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")):
            raise DataConfigError(
                f"--data {spec.spec!r}: column {cfg.image_column!r} has type {feature}, expected an Image "
                "feature or binary image bytes; set --data.image-column to the image column."
            )
        self.dataset = dataset
        self.metadata_columns = [
            c for c in dataset.column_names if c not in (cfg.image_column, cfg.caption_column)
        ]

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> RawRecord:
        row = self.dataset[index]
        key = str(row[self.cfg.key_column]) if self.cfg.key_column else f"{index:09d}"
        metadata = {c: row[c] for c in self.metadata_columns if _json_ready(row[c])}
        record = RawRecord(key=key, origin=self.name, caption=row.get(self.cfg.caption_column), metadata=metadata)
        value = row[self.cfg.image_column]
        if isinstance(value, dict):
            record.image = value.get("bytes") or _read_local(value.get("path"), record)
        elif isinstance(value, (bytes, bytearray)):
            record.image = bytes(value)
        else:
            record.problem = ("missing_image", "the image column is empty")
        return record


def _load(spec: SourceSpec, cfg: DataConfig) -> Any:
    import datasets

    try:
        if spec.kind == "datasets_disk":
            dataset = datasets.load_from_disk(spec.locations[0])
        elif spec.kind == "datasets_files":
            builder = "parquet" if spec.locations[0].lower().endswith(".parquet") else "arrow"
            dataset = datasets.load_dataset(builder, data_files=list(spec.locations), split="train", cache_dir=cfg.cache_dir)
        else:
            dataset = datasets.load_dataset(spec.locations[0], split=cfg.split, cache_dir=cfg.cache_dir)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataConfigError(f"--data {spec.spec!r}: could not load the dataset ({type(e).__name__}: {e}).") from e
    if isinstance(dataset, datasets.DatasetDict):
        if cfg.split not in dataset:
            raise DataConfigError(
                f"--data {spec.spec!r} has splits {sorted(dataset)}, not {cfg.split!r}; set --data.split."
            )
        dataset = dataset[cfg.split]
    return dataset


def _check_columns(dataset: Any, cfg: DataConfig, spec: str) -> None:
    columns = dataset.column_names
    wanted = {"image_column": cfg.image_column}
    if cfg.missing_caption == "skip":  # with "empty", a dataset without captions trains unconditionally
        wanted["caption_column"] = cfg.caption_column
    if cfg.key_column:
        wanted["key_column"] = cfg.key_column
    for field_name, column in wanted.items():
        if column not in columns:
            raise DataConfigError(
                f"--data {spec!r} has no column {column!r}; its columns are {columns}. "
                f"Set --data.{field_name.replace('_', '-')} to the right one."
            )


def _read_local(path: str | None, record: RawRecord) -> bytes | None:
    """An Image feature that stores only a path (not embedded bytes): read the local file."""
    if not path or not Path(path).is_file():
        record.problem = ("missing_file", f"image path {path!r} is not a readable local file")
        return None
    return Path(path).read_bytes()


def _json_ready(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
