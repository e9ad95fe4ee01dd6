"""A local folder of images with captions, following the `datasets` imagefolder convention.

Images: every file under the folder whose extension is in `image_extensions`, sorted by relative path
(so the index is stable). Captions, first found wins:
  1. a `metadata.jsonl` or `metadata.csv` (in the folder or any subfolder) with a `file_name` column,
     relative to that metadata file, and a caption column (`caption_column`, may hold a list in JSONL);
     its other columns are kept as metadata;
  2. a sidecar `<stem>.txt` next to the image;
  3. none: the `missing_caption` policy decides.
A metadata entry that points outside the folder or at a missing file becomes a bad sample, counted.
Key: the relative path without extension, e.g. `cats/0001`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from data.config import DataConfig, DataConfigError
from data.sample import RawRecord

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class ImageFolderSource:
    """Map-style: `len(source)` records, `source.record(i)` reads image and caption bytes."""

    def __init__(self, root: str | Path, cfg: DataConfig) -> None:
        self.root = Path(os.path.normpath(Path(root).absolute()))
        self.cfg = cfg
        self.name = str(root)
        entries: dict[str, dict[str, Any]] = {}
        for rel in self._image_files():
            entries[rel] = {}
        for rel, row in self._metadata_rows():
            entries[rel] = row
        if not entries:
            raise DataConfigError(
                f"--data {root}: the folder holds no images with extensions {list(cfg.image_extensions)} "
                "and no metadata.jsonl/metadata.csv."
            )
        self.paths = sorted(entries)
        self.rows = [entries[p] for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def _image_files(self) -> list[str]:
        suffixes = tuple("." + ext.lower() for ext in self.cfg.image_extensions)
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.lower().endswith(suffixes) and not name.startswith("."):
                    found.append(os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/"))
        return found

    def _metadata_rows(self) -> list[tuple[str, dict[str, Any]]]:
        rows = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in METADATA_FILES:
                if name in filenames:
                    rows.extend(self._read_metadata(Path(dirpath) / name))
        return rows

    def _read_metadata(self, path: Path) -> list[tuple[str, dict[str, Any]]]:
        """Rows keyed by their image path relative to the root (unchecked yet: see `record`)."""
        if path.name.endswith(".jsonl"):
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataConfigError(f"{path}, line {n}: not valid JSON ({e}); fix or remove the line.") from e
        else:
            with path.open(encoding="utf-8", errors="replace", newline="") as f:
                rows = list(csv.DictReader(f))
        out = []
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise DataConfigError(f"{path}, row {n}: every row needs a 'file_name' (the image path relative to it).")
            rel = os.path.normpath(os.path.join(os.path.relpath(path.parent, self.root), row["file_name"]))
            out.append((rel.replace(os.sep, "/"), row))
        return out

    def image_path(self, index: int) -> Path | None:
        """The image file of record `index` (None when unsafe, missing or not an image): for header reads."""
        rel = self.paths[index]
        path = Path(os.path.normpath(self.root / rel))
        suffixes = tuple("." + e.lower() for e in self.cfg.image_extensions)
        ok = path.is_relative_to(self.root) and rel.lower().endswith(suffixes) and path.is_file()
        return path if ok else None

    def record(self, index: int) -> RawRecord:
        rel, row = self.paths[index], self.rows[index]
        key = os.path.splitext(rel)[0]
        path = Path(os.path.normpath(self.root / rel))
        metadata = {k: v for k, v in row.items() if k not in ("file_name", self.cfg.caption_column)}
        record = RawRecord(key=key, origin=self.name, metadata=metadata)
        # `rel` may come from a metadata file: never follow it outside the folder (../../etc/passwd).
        # Checked on the normalised path, not the resolved one, so symlinked files (hub caches) work.
        if not path.is_relative_to(self.root):
            record.problem = ("unsafe_path", f"{rel!r} points outside the data folder")
            return record
        if not path.is_file():
            record.problem = ("missing_file", f"{rel} does not exist")
            return record
        if not rel.lower().endswith(tuple("." + e.lower() for e in self.cfg.image_extensions)):
            record.problem = ("unexpected_file_type", f"{rel} is not one of {list(self.cfg.image_extensions)}")
            return record
        record.image = path.read_bytes()
        record.caption = self._caption(row, path)
        return record

    def _caption(self, row: dict[str, Any], path: Path) -> object:
        if self.cfg.caption_column in row:
            return row[self.cfg.caption_column]
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_bytes()
        return None
