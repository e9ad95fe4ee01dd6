"""Captions from whatever a source stores (str, bytes, list, nothing) to one training string.

- missing (no value, empty list): the `missing_caption` policy: skip the sample, or use "".
- empty or whitespace-only: "" (the unconditional prompt), never a skip.
- bytes that are not UTF-8: decoded with U+FFFD replacement characters, not dropped.
- a list: one entry, chosen by the sample's own random number (same choice for a given seed,
  epoch and sample whatever the worker count).
- over-long: kept whole; the tokenizer truncates to its max_length.
- tag-style captions ("1girl, solo, red hair"), with `shuffle_tags`: split at `tag_separator`, the
  first `keep_tags` tags stay in place and the others are permuted by the sample's own generator
  (a function of seed, epoch and sample), then joined again. Training only: a deterministic pass
  (validation, statistics, a cache build) keeps the stored order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from data.decode import BadSample

NO_CAPTION = None


@dataclass(frozen=True)
class TagShuffle:
    """How a tag-style caption is shuffled: the first `keep` tags stay, the rest are permuted."""

    keep: int = 0
    separator: str = ","

    def joiner(self) -> str:
        """What goes between tags when they are joined again: the separator and one space (", "),
        or the separator alone when it is whitespace or already ends in it."""
        return self.separator if not self.separator.strip() or self.separator[-1].isspace() else self.separator + " "


def caption_text(value: object) -> str:
    """A single caption value (str or bytes) as a stripped string; bytes decode with replacement."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise BadSample("bad_caption", f"caption of type {type(value).__name__}, expected text or a list of texts")
    return value.strip()


def resolve_caption(raw: object, *, missing: Literal["skip", "empty"], choice: float,
                    tags: TagShuffle | None = None, tag_seed: int | None = None) -> str:
    """Turn a stored caption into the training string.

    `choice` is a uniform number in [0, 1) from the sample's generator; it picks among list captions.
    With `tags` and a `tag_seed` (the sample's own 64-bit draw) the chosen caption's tags are shuffled;
    `tag_seed=None` (a deterministic pass) keeps their order.
    """
    if isinstance(raw, (list, tuple)):
        if not raw:
            raw = NO_CAPTION
        else:
            raw = raw[variant_position(choice, len(raw))]
    if raw is NO_CAPTION:
        if missing == "skip":
            raise BadSample("missing_caption", "no caption (set missing_caption='empty' to train it unconditionally)")
        return ""
    text = caption_text(raw)
    if tags is None or tag_seed is None:
        return text
    return shuffle_tags(text, tags, tag_seed)


def variant_position(choice: float, n: int) -> int:
    """Which of a list caption's `n` entries the sample's uniform `choice` in [0, 1) picks."""
    return min(int(choice * n), n - 1)


def caption_variants(raw: object, *, missing: Literal["skip", "empty"]) -> list[str]:
    """Every caption `resolve_caption` can make of `raw` (before tag shuffling), one per list position:
    `resolve_caption(raw, choice=c) == caption_variants(raw)[variant_position(c, len(...))]`.

    The latent cache stores them (deduplicated) so that a cached run picks the same caption per epoch
    as an uncached one. Raises BadSample as `resolve_caption` would (missing caption with "skip", an
    entry that is not text), so a list with one unreadable entry is a bad sample in every epoch.
    """
    entries = (list(raw) or [NO_CAPTION]) if isinstance(raw, (list, tuple)) else [raw]
    if missing == "skip" and NO_CAPTION in entries:
        raise BadSample("missing_caption", "no caption (set missing_caption='empty' to train it unconditionally)")
    return ["" if entry is NO_CAPTION else caption_text(entry) for entry in entries]


def shuffle_tags(text: str, tags: TagShuffle, seed: int) -> str:
    """`text`'s tags (split at the separator, stripped, empty ones dropped) with all but the first
    `keep` permuted by a generator seeded with `seed` alone, joined by `tags.joiner()`.

    A caption with no separator is one tag and comes back unchanged (stripped)."""
    parts = [t.strip() for t in text.split(tags.separator)]
    parts = [t for t in parts if t]
    if len(parts) <= 1:
        return text
    head, tail = parts[: tags.keep], parts[tags.keep :]
    random.Random(seed).shuffle(tail)  # Fisher-Yates on the sample's own stream, never the global RNG
    return tags.joiner().join(head + tail)
