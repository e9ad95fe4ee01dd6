"""The `--data` spec: one string that names a source, and the rules that tell which kind it is.

Rules, first match wins:

1. `hf:NAME`                        a dataset on the Hugging Face hub (needs the network), split `split`.
2. `wds:SPEC`                       webdataset shards, whatever SPEC looks like (e.g. a URL without .tar).
3. `pipe:CMD`                       one shard read from a shell command; only with allow_pipe_urls.
4. a brace pattern `a-{000..009}.tar`, a glob `a/*.tar`, a URL, a `.tar`/`.tar.gz`/`.tgz` file:
                                    webdataset shards.
5. a `.txt` file                    a shard list: one path or URL per line (relative paths are relative
                                    to the list file; blank lines and `#` comments are ignored).
6. `.parquet` / `.arrow` files (a file, a brace pattern or a glob): a `datasets` dataset from files.
7. a folder with `dataset_info.json`, `state.json` or `dataset_dict.json`: a `datasets.save_to_disk` folder.
8. a folder with `.tar` files at its top level: webdataset shards (all of them, sorted).
9. a folder with `.parquet` or `.arrow` files at its top level: a `datasets` dataset from those files.
10. any other folder: an image folder (captions from `metadata.jsonl`/`metadata.csv` or sidecar `.txt`).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import braceexpand

from data.config import DataConfigError

SourceKind = Literal["imagefolder", "datasets_disk", "datasets_files", "hub", "webdataset"]

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TABLE_SUFFIXES = (".parquet", ".arrow")
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
BRACE_PATTERN = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed `--data` spec: the kind of source and where it lives (paths or URLs, already expanded)."""

    kind: SourceKind
    locations: tuple[str, ...]
    spec: str


def parse_source_spec(spec: str, *, allow_pipe_urls: bool = False) -> SourceSpec:
    """Apply the rules in this module's docstring; raise DataConfigError saying what was expected."""
    spec = spec.strip()
    if not spec:
        raise DataConfigError("No data source given: pass --data.source SPEC (a folder, shards, hf:NAME, ...).")
    if spec.startswith("hf:"):
        name = spec[3:].strip()
        if not name:
            raise DataConfigError(f"--data {spec!r}: write the hub dataset name after 'hf:', e.g. hf:user/name.")
        return SourceSpec("hub", (name,), spec)
    if spec.startswith("wds:"):
        return _shards(spec, expand_shard_pattern(spec[4:], allow_pipe_urls), allow_pipe_urls)
    if spec.startswith("pipe:") or _is_url(spec) or _is_pattern(spec):
        locations = expand_shard_pattern(spec, allow_pipe_urls)
        if all(_has_suffix(loc, TABLE_SUFFIXES) for loc in locations):
            return SourceSpec("datasets_files", tuple(locations), spec)
        return _shards(spec, locations, allow_pipe_urls)
    path = Path(spec)
    if path.is_file():
        return _single_file(spec, path, allow_pipe_urls)
    if path.is_dir():
        return _folder(spec, path)
    raise DataConfigError(
        f"--data {spec!r}: no such file or folder. Give an image folder, a save_to_disk folder, "
        "parquet/arrow files, shards (*.tar, a brace pattern or a .txt list), or hf:NAME."
    )


def _single_file(spec: str, path: Path, allow_pipe_urls: bool) -> SourceSpec:
    if _has_suffix(spec, SHARD_SUFFIXES):
        return SourceSpec("webdataset", (str(path),), spec)
    if _has_suffix(spec, TABLE_SUFFIXES):
        return SourceSpec("datasets_files", (str(path),), spec)
    if path.suffix == ".txt":
        return _shards(spec, read_shard_list(path), allow_pipe_urls)
    raise DataConfigError(
        f"--data {spec!r}: a file must be a shard (.tar, .tar.gz, .tgz), a shard list (.txt) "
        "or a table (.parquet, .arrow); for a folder of images pass the folder."
    )


def _folder(spec: str, path: Path) -> SourceSpec:
    if any((path / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
        return SourceSpec("datasets_disk", (str(path),), spec)
    top = sorted(p for p in path.iterdir() if p.is_file())
    shards = [str(p) for p in top if _has_suffix(p.name, SHARD_SUFFIXES)]
    if shards:
        return SourceSpec("webdataset", tuple(shards), spec)
    tables = [str(p) for p in top if _has_suffix(p.name, TABLE_SUFFIXES)]
    if tables:
        return SourceSpec("datasets_files", tuple(tables), spec)
    return SourceSpec("imagefolder", (str(path),), spec)


def _shards(spec: str, locations: list[str], allow_pipe_urls: bool) -> SourceSpec:
    for loc in locations:
        check_shard_location(loc, allow_pipe_urls)
    return SourceSpec("webdataset", tuple(locations), spec)


def expand_shard_pattern(pattern: str, allow_pipe_urls: bool = False) -> list[str]:
    """Brace-expand (and for local paths glob-expand) a shard pattern into a sorted list of locations."""
    if pattern.startswith("pipe:"):
        check_shard_location(pattern, allow_pipe_urls)
        return [pattern]
    locations: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if not _is_url(item) and any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataConfigError(f"--data {pattern!r}: the glob {item!r} matches no files.")
            locations.extend(matches)
        else:
            locations.append(item)
    if not locations:
        raise DataConfigError(f"--data {pattern!r} expands to no shards.")
    return locations


def read_shard_list(path: Path) -> list[str]:
    """Read a shard list file: one path or URL per line; local paths are relative to the list file."""
    locations = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("pipe:") or _is_url(line) or os.path.isabs(line):
            locations.append(line)
        else:
            locations.append(str(path.parent / line))
    if not locations:
        raise DataConfigError(f"Shard list {path} lists no shards (one path or URL per line).")
    return locations


def check_shard_location(location: str, allow_pipe_urls: bool) -> None:
    """Refuse `pipe:` without permission and local shards that do not exist, before any training starts."""
    if location.startswith("pipe:"):
        if not allow_pipe_urls:
            raise DataConfigError(
                f"Shard {location!r} is a pipe: URL, which runs a shell command. If you wrote this spec "
                "yourself and trust it, set --data.allow-pipe-urls True."
            )
        return
    if _is_url(location):
        return
    local = location[len("file://"):] if location.startswith("file://") else location
    if not Path(local).is_file():
        raise DataConfigError(f"Shard {location!r} does not exist; check the --data spec or the shard list.")


def _is_url(text: str) -> bool:
    scheme = urlparse(text).scheme
    return len(scheme) > 1 and "://" in text


def _is_pattern(text: str) -> bool:
    return bool(BRACE_PATTERN.search(text)) or (not Path(text).exists() and any(c in text for c in "*?["))


def _has_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    return name.lower().endswith(suffixes)
