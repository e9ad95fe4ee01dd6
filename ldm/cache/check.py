"""Is a cache folder usable for this run? Refuse a stale one naming what differs, catch a damaged one.

`cache_is_valid` decides build-or-reuse (False: no finished cache, build it; True: reuse it;
StaleCacheError / CacheError: it exists but differs or is damaged, and is never silently rebuilt
over: the user chose that folder, and a damaged disk should be seen). `open_cache` checks the same
and returns the reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from foundation import sha256_file
from ldm.cache.reader import LatentCache
from text_encoder.fingerprint import INFORMATIONAL_FIELDS

MANIFEST_NAME = "cache_manifest.json"
NULL_TEXT_NAME = "null_text.safetensors"
_ADVICE = "delete the folder or pass another --cache-dir"
VERIFY_LIMIT_BYTES = 16 << 30  # verify_sha256=None hashes caches up to this size on open (beyond: sizes only)
_COMPONENT_NAMES = {"vae": "autoencoder", "text_encoder": "text encoder", "data": "data spec",
                    "data_files": "set of data files", "dtype": "storage dtype or encoder precision",
                    "format": "cache format"}


class CacheError(RuntimeError):
    """A latent cache that cannot be used; the message says why and what to do."""


class IncompleteCacheError(CacheError):
    """No manifest: the build was interrupted (or never ran)."""


class StaleCacheError(CacheError):
    """The cache was built with another autoencoder, text encoder, data spec, data files or dtype."""

    def __init__(self, message: str, component: str, fields: list[str]) -> None:
        super().__init__(message)
        self.component, self.fields = component, fields


def check_key(cache_dir: Path, built: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise StaleCacheError naming the first component (and its fields) that differs.

    Parts this run does not use are not compared: the text encoder and text dtype when text is
    encoded on the fly, the data files when `expected["data_files"]` is None (unchecked).
    """
    where = f"the cache at {cache_dir}"
    if built.get("format") != expected["format"]:
        raise StaleCacheError(f"{where} has format {built.get('format')!r}, this code reads {expected['format']!r}; "
                              f"{_ADVICE}.", "format", ["format"])
    for component in ("vae", "data", "data_files", "dtype"):
        want, have = expected.get(component), built.get(component)
        if component == "data_files" and want is None:
            continue
        ignore = ("text",) if component == "dtype" and expected["text_encoder"] is None else ()
        fields = _differing(have, want, ignore=ignore)
        if fields:
            raise StaleCacheError(_stale_message(where, component, fields, built, expected), component, fields)
    wanted, have = expected["text_encoder"], built.get("text_encoder")
    if wanted is not None and have is None:
        raise StaleCacheError(f"{where} holds no text embeddings (it was built without --cache-text); {_ADVICE}.",
                              "text_encoder", ["text_encoder"])
    if wanted is not None:
        fields = _differing(have, wanted, ignore=INFORMATIONAL_FIELDS)
        if fields:
            raise StaleCacheError(_stale_message(where, "text_encoder", fields, built, expected),
                                  "text_encoder", fields)


def _differing(built: Any, expected: Any, ignore: tuple[str, ...]) -> list[str]:
    if not isinstance(built, dict) or not isinstance(expected, dict):
        return [] if built == expected else ["value"]
    keys = sorted((set(built) | set(expected)) - set(ignore))
    return [k for k in keys if built.get(k, "<missing>") != expected.get(k, "<missing>")]


def _stale_message(where: str, component: str, fields: list[str], built: dict, expected: dict) -> str:
    def value(side: dict, field: str) -> Any:
        part = side.get(component)
        return part.get(field, "<missing>") if isinstance(part, dict) else part

    names = ", ".join(repr(f) for f in fields)
    details = "; ".join(f"{f}: cache {value(built, f)!r}, this run {value(expected, f)!r}" for f in fields[:3])
    noun = ("fingerprint " if component in ("vae", "text_encoder") else "") + ("field" if len(fields) == 1 else "fields")
    why = ""
    if component == "data_files":
        why = (" the data was edited after the cache was built (images or captions replaced, added, removed or "
               "renamed; or the folder was copied without keeping file times);")
    return (f"{where} was built with a different {_COMPONENT_NAMES[component]} ({noun} {names} "
            f"differ{'s' if len(fields) == 1 else ''}: {details});{why} {_ADVICE}.")


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"cannot read the cache manifest {path} ({e}); "
                         "delete its folder and rerun to rebuild it.") from e
    if not isinstance(manifest, dict):
        raise CacheError(f"the cache manifest {path} is not a JSON object; delete its folder and rerun to rebuild it.")
    return manifest


def open_cache(cache_dir: str | Path, expected: dict[str, Any], *, verify_sha256: bool | None = True,
               in_memory: bool | None = None) -> LatentCache:
    """Open a finished cache built with `expected` (a `CacheSpec.key`), or raise a CacheError.

    Always checks that every shard file exists with its recorded size; `verify_sha256` also hashes
    them (it reads the whole cache once; None: only caches up to VERIFY_LIMIT_BYTES). `in_memory`:
    see `ldm.cache.reader` (None picks by size).
    """
    cache_dir = Path(cache_dir)
    manifest = _checked_manifest(cache_dir, expected, verify_sha256)
    return LatentCache(cache_dir, manifest, in_memory=in_memory)


def cache_is_valid(cache_dir: str | Path, expected: dict[str, Any], *, verify_sha256: bool = False) -> bool:
    """Build if missing, reuse if valid, refuse if stale: False when there is no finished cache (build
    it), True when it matches `expected`; StaleCacheError/CacheError when it exists but differs or is damaged."""
    try:
        _checked_manifest(Path(cache_dir), expected, verify_sha256)
    except IncompleteCacheError:
        return False
    return True


def _checked_manifest(cache_dir: Path, expected: dict[str, Any], verify_sha256: bool | None) -> dict[str, Any]:
    manifest_path = cache_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise IncompleteCacheError(
            f"the cache at {cache_dir} has no {MANIFEST_NAME}: its build was interrupted or never ran. "
            "Rerun the same command with --cache-latents to build it (finished shards are kept)."
        )
    manifest = read_manifest(manifest_path)
    check_key(cache_dir, manifest.get("key", {}), expected)
    if verify_sha256 is None:
        verify_sha256 = sum(info["bytes"] for info in manifest["files"].values()) <= VERIFY_LIMIT_BYTES
    for name, info in manifest["files"].items():
        path = cache_dir / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            raise CacheError(f"the cache at {cache_dir} is damaged: {name} is missing or has the wrong size. "
                             "Delete the folder and rerun to rebuild it.")
        if verify_sha256 and sha256_file(path) != info["sha256"]:
            raise CacheError(f"the cache at {cache_dir} is damaged: {name} does not match its sha256 in "
                             f"{MANIFEST_NAME}. Delete the folder and rerun to rebuild it.")
    return manifest
