"""Durable writes: a file or folder either appears whole under its final name or not at all.

Everything is written under a temporary name, fsynced, then renamed (``os.replace`` is atomic on
POSIX within one filesystem), and the parent folder is fsynced so the rename itself survives a
power cut. Hashes are sha256, streamed in chunks so multi-GB weights never sit in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file below ``folder``, then every folder (deepest first), then ``folder`` itself."""
    folder = Path(folder)
    dirs = []
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            dirs.append(path)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(folder)


def write_bytes_atomic(path: str | Path, payload: bytes) -> dict[str, Any]:
    """Write ``payload`` to ``path`` atomically; returns ``{"bytes", "sha256"}`` of what was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return {"bytes": len(payload), "sha256": sha256_bytes(payload)}


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2, sort_keys: bool = True) -> dict[str, Any]:
    """``obj`` as UTF-8 JSON (with a final newline), written atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; rename it to ``out_dir`` only on success.

    An exception (or a kill) leaves ``out_dir`` as it was; the temporary sibling is named
    ``.NAME.tmp-XXXXXXXX`` so ``remove_stale_siblings`` can clear what a kill left behind. With
    ``overwrite`` an existing folder is replaced: moved aside, the new one renamed in, the old deleted.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_stale_siblings(out_dir: str | Path) -> list[Path]:
    """Delete the ``.NAME.tmp-*`` / ``.NAME.old-*`` folders an interrupted ``atomic_folder`` left."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    stale = [p for p in out_dir.parent.iterdir()
             if p.name.startswith((f".{out_dir.name}.tmp-", f".{out_dir.name}.old-")) and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale
