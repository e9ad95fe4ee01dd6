"""Seeds derived from named parts, so independent random streams never overlap."""

from __future__ import annotations

import hashlib


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts: (seed, "order", epoch) and (seed, "flip", epoch) never collide,
    and adding a stream does not shift the others. 63 bits fit torch and numpy generators alike."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
