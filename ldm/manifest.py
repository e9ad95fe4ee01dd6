"""The pipeline folder on disk: its manifest, its per-file sha256, and the atomic write.

A saved pipeline is a diffusers ``StableDiffusionPipeline`` folder plus ``ldm_manifest.json``.
The manifest is written last, inside a temporary folder that is renamed into place only when
complete, so a folder with a manifest was written whole. It lists every other file with its sha256
(safetensors checks its header, not its bytes: a flipped byte in a weight would load silently),
and its ``manifest_id`` is a digest of that list, which generated images record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from foundation import sha256_file

MANIFEST_NAME = "ldm_manifest.json"
MANIFEST_FORMAT = "ldm-pipeline/1"
# What every pipeline folder must hold; a folder missing one was not written by save_pretrained.
REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
REQUIRED_DIRS = ("tokenizer",)


class PipelineFolderError(FileNotFoundError):
    """A path that is not a complete pipeline folder."""


class PipelineMismatchError(ValueError):
    """A pipeline folder whose files or stages no longer match what its manifest recorded."""


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "bytes"}} of every file except the manifest, sorted."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST_NAME:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def manifest_id(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the sorted (path, sha256) list: changes whenever any weight or config does."""
    listing = "".join(f"{rel}\t{files[rel]['sha256']}\n" for rel in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


def check_folder_complete(folder: Path) -> None:
    """Raise ``PipelineFolderError`` saying what is missing, before any model is loaded."""
    if not folder.exists():
        raise PipelineFolderError(f"pipeline folder {folder} does not exist")
    if not folder.is_dir():
        raise PipelineFolderError(f"{folder} is a file; give the pipeline folder (the one with model_index.json)")
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    missing += [d + "/" for d in REQUIRED_DIRS if not (folder / d).is_dir()]
    if not (folder / MANIFEST_NAME).is_file():
        missing.append(MANIFEST_NAME)
    if missing:
        hint = (
            "it is not a pipeline folder written by LatentDiffusionPipeline.save_pretrained"
            if not (folder / "model_index.json").is_file()
            else "the save was interrupted or files were removed; save it again"
        )
        raise PipelineFolderError(f"pipeline folder {folder} is incomplete (missing {', '.join(missing)}): {hint}")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipelineFolderError(f"{path} is not valid JSON ({e}); the folder is damaged") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise PipelineFolderError(
            f"{path} has format {manifest.get('format')!r}; this version reads {MANIFEST_FORMAT!r}"
        )
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any], check_hashes: bool = True) -> None:
    """Every file the manifest lists is present, the same size and (optionally) the same sha256."""
    recorded: dict[str, dict[str, Any]] = manifest["files"]
    problems = []
    for rel, info in recorded.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != info["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, the manifest says {info['bytes']}")
        elif check_hashes and sha256_file(path) != info["sha256"]:
            problems.append(f"{rel} has changed (sha256 differs from the manifest)")
    if problems:
        raise PipelineMismatchError(
            f"pipeline folder {folder} does not match its manifest (fingerprint mismatch): "
            + "; ".join(problems)
            + ". The folder was modified or damaged after saving; save the pipeline again."
        )
