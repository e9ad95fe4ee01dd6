"""Captions from whatever a source stores (str, bytes, list, nothing) to one training string.

- missing (no value, empty list): the `missing_caption` policy: skip the sample, or use "".
- empty or whitespace-only: "" (the unconditional prompt), never a skip.
- bytes that are not UTF-8: decoded with U+FFFD replacement characters, not dropped.
- a list: one entry, chosen by the sample's own random number (same choice for a given seed,
  epoch and sample whatever the worker count).
- over-long: kept whole; the tokenizer truncates to its max_length.
"""

from __future__ import annotations

from typing import Literal

from data.decode import BadSample

NO_CAPTION = None


def caption_text(value: object) -> str:
    """A single caption value (str or bytes) as a stripped string; bytes decode with replacement."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise BadSample("bad_caption", f"caption of type {type(value).__name__}, expected text or a list of texts")
    return value.strip()


def resolve_caption(raw: object, *, missing: Literal["skip", "empty"], choice: float) -> str:
    """Turn a stored caption into the training string.

    `choice` is a uniform number in [0, 1) from the sample's generator; it picks among list captions.
    """
    if isinstance(raw, (list, tuple)):
        if not raw:
            raw = NO_CAPTION
        else:
            raw = raw[min(int(choice * len(raw)), len(raw) - 1)]
    if raw is NO_CAPTION:
        if missing == "skip":
            raise BadSample("missing_caption", "no caption (set missing_caption='empty' to train it unconditionally)")
        return ""
    return caption_text(raw)
