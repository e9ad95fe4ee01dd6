"""A cheap fingerprint of the files behind a `--data` spec, so a cache over data edited in place is refused.

The fingerprint is the number of files, their total size and the sha256 of the sorted listing of
(relative path, size in bytes, mtime in ns): one `stat` per file, no file contents read. What it sees:

    image folder       every image, sidecar `.txt` and `metadata.jsonl`/`.csv` (hidden files and
                       folders skipped, as the loader does): an image or caption replaced, added,
                       removed or renamed, and a metadata file edited
    save_to_disk       every file of the folder (the arrow files and their `state.json`)
    parquet/arrow      each listed file
    local shards       each shard file
What it does not see: a file rewritten with the same size and an mtime set back to the old value
(`touch -d`, some sync tools); shards given as URLs and `hf:` hub datasets, whose files are not
local (their names are keyed, not their contents: pin a hub revision or copy the data locally).
Copying a folder without keeping mtimes (`cp -r` without `-p`) changes the fingerprint, so a cache
is then refused although the data is the same; rebuild it, or set `check_data_files=False`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import data
from data.mix import mixed_sources
from data.spec import parse_source_spec

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def data_files_fingerprint(cfg: data.DataConfig) -> dict[str, Any]:
    """{"kind", "files", "bytes", "listing_sha256", "unchecked"}: JSON-ready, equal iff no file changed.
    A mix of sources: {"kind": "mix", "sources": [one such dict per source]}."""
    if cfg.sources:
        return {"kind": "mix", "sources": [_source_fingerprint(s.data_config(cfg)) for s in mixed_sources(cfg)]}
    return _source_fingerprint(cfg)


def _source_fingerprint(cfg: data.DataConfig) -> dict[str, Any]:
    spec = parse_source_spec(cfg.source, allow_pipe_urls=cfg.allow_pipe_urls)
    entries: list[tuple[str, int, int]] = []  # (name, size, mtime_ns)
    unchecked = 0  # locations whose contents cannot be stat'ed (URLs, pipes, the hub)
    if spec.kind == "imagefolder":
        suffixes = tuple("." + ext.lower() for ext in cfg.image_extensions) + (".txt",)
        entries = _walk(Path(spec.locations[0]), lambda name: name.lower().endswith(suffixes) or name in METADATA_FILES)
    elif spec.kind == "datasets_disk":
        entries = _walk(Path(spec.locations[0]), lambda name: True)
    elif spec.kind == "hub":
        unchecked = 1
    else:  # webdataset shards, parquet/arrow files
        for location in spec.locations:
            local = location.removeprefix("file://")
            if "://" in local or local.startswith("pipe:") or not os.path.isfile(local):
                unchecked += 1
                continue
            st = os.stat(local)
            entries.append((location, st.st_size, st.st_mtime_ns))
    listing = hashlib.sha256()
    for name, size, mtime in sorted(entries):
        listing.update(f"{name}\0{size}\0{mtime}\n".encode("utf-8", errors="surrogateescape"))
    return {"kind": spec.kind, "files": len(entries), "bytes": sum(e[1] for e in entries),
            "listing_sha256": listing.hexdigest(), "unchecked": unchecked}


def _walk(root: Path, wanted: Any) -> list[tuple[str, int, int]]:
    """(path relative to root, size, mtime_ns) of the non-hidden files under root that `wanted(name)` keeps."""
    found: list[tuple[str, int, int]] = []
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, f"{prefix}{entry.name}/"))
                elif entry.is_file() and wanted(entry.name):
                    st = entry.stat()
                    found.append((prefix + entry.name, st.st_size, st.st_mtime_ns))
    return found
