"""Sample keys are untrusted text (`../../x` occurs in real shards): these turn them into safe names."""

from __future__ import annotations

import hashlib
import re

UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9_\-]")


def shard_key(key: str) -> str:
    """A key safe to write into a shard: path components of [A-Za-z0-9_-] only, no `.`/`..`/empty parts.

    Dots go too, because webdataset splits a member name at the first dot of its file name
    (`a.b.jpg` would be read back as key `a`, extension `b.jpg`). Keys already safe stay unchanged.
    """
    parts = [UNSAFE_CHARACTERS.sub("_", part) for part in key.split("/") if part not in ("", ".", "..")]
    return "/".join(parts) or "sample"


def key_to_filename(key: str) -> str:
    """A flat file name for a key (for caches): readable prefix plus a hash, so distinct keys never
    collide and no key can reach outside the folder it is joined to."""
    digest = hashlib.blake2b(key.encode("utf-8", errors="surrogatepass"), digest_size=8).hexdigest()
    readable = UNSAFE_CHARACTERS.sub("_", key)[-80:].strip("_") or "key"
    return f"{readable}-{digest}"
