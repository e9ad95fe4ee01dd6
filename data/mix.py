"""Several sources mixed: `--data.sources A B ...`, each entry a `--data` spec with its own options.

    --data.sources "photos/#repeat=3&caption_column=alt" "hf:user/set#caption_column=text"
    --data.sources "own/#weight=1" "public/#weight=3"

An entry is SPEC or SPEC#OPTIONS, OPTIONS being `name=value` pairs joined by `&`:

    repeat=R           each of the source's samples is seen R times per epoch (default 1; 0.5: half of them)
    weight=W           the source's share of all batches instead, W / sum of weights (all or none set it)
    caption_column, missing_caption, image_column, key_column, split, shuffle_tags, keep_tags, tag_separator
                       as the DataConfig fields, for this source alone (default: the DataConfig's);
                       shuffle_tags takes true/false, e.g. `tags/#shuffle_tags=true&keep_tags=1`

In a --config file an entry may also be an object: {"source": "photos/", "repeat": 3, ...}.

Every batch comes from one source (and one bucket): the batch schedule (data/planned.py) holds each
source the number of times its repeat or weight asks for, so the mix is exact per epoch on every
process and after a resume. `loader.source_sample_counts` tells how many samples each one gave.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from data.config import DataConfig

SEPARATOR = "#"
PER_SOURCE_FIELDS = ("caption_column", "missing_caption", "image_column", "key_column", "split", "shuffle_tags",
                     "keep_tags", "tag_separator")
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class SourceConfig:
    """One source of a mix and the options that differ from the DataConfig's."""

    source: str
    """The --data spec of this source."""
    repeat: float = 1.0
    """How many times each sample is seen per epoch (relative to the other sources)."""
    weight: float | None = None
    """Share of batches (normalised over the sources); when set, `repeat` is not used."""
    caption_column: str | None = None
    """Caption column of this source (default: the DataConfig's)."""
    missing_caption: Literal["skip", "empty"] | None = None
    """Missing-caption policy of this source (default: the DataConfig's)."""
    image_column: str | None = None
    """Image column of this source (default: the DataConfig's)."""
    key_column: str | None = None
    """Key column of this source (default: the DataConfig's)."""
    split: str | None = None
    """Split of this source (default: the DataConfig's)."""
    shuffle_tags: bool | None = None
    """Shuffle this source's tag-style captions (default: the DataConfig's)."""
    keep_tags: int | None = None
    """Tags of this source kept in place when shuffling (default: the DataConfig's)."""
    tag_separator: str | None = None
    """Tag separator of this source's captions (default: the DataConfig's)."""

    def data_config(self, base: DataConfig) -> DataConfig:
        """The DataConfig that reads this source alone."""
        changes = {name: getattr(self, name) for name in PER_SOURCE_FIELDS if getattr(self, name) is not None}
        return base.replace(source=self.source, sources=(), **changes)


def parse_source_entry(entry: str) -> SourceConfig:
    """`SPEC#repeat=3&caption_column=alt` -> SourceConfig; raises ValueError saying what is wrong."""
    spec, _, options = entry.partition(SEPARATOR)
    if not spec.strip():
        raise ValueError(f"sources entry {entry!r} names no source before '#'")
    values: dict[str, Any] = {}
    known = {f.name for f in fields(SourceConfig)} - {"source"}
    for pair in filter(None, options.split("&")):
        name, eq, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or name not in known:
            raise ValueError(f"sources entry {entry!r}: {pair!r} is not one of {sorted(known)} as name=value")
        values[name] = _option_value(entry, name, value)
    source = SourceConfig(source=spec.strip(), **values)
    if source.repeat < 0 or (source.weight is not None and source.weight <= 0):
        raise ValueError(f"sources entry {entry!r}: repeat must be >= 0 and weight > 0")
    if source.missing_caption not in (None, "skip", "empty"):
        raise ValueError(f"sources entry {entry!r}: missing_caption must be 'skip' or 'empty'")
    return source


def _option_value(entry: str, name: str, value: str) -> object:
    """One option's typed value; the separator is kept as written (it may be a space)."""
    if name in ("repeat", "weight"):
        return float(value)
    if name == "keep_tags":
        if not value.strip().isdigit():
            raise ValueError(f"sources entry {entry!r}: keep_tags must be a whole number >= 0, not {value!r}")
        return int(value)
    if name == "shuffle_tags":
        if value.strip().lower() not in BOOLEAN_WORDS:
            raise ValueError(f"sources entry {entry!r}: shuffle_tags must be true or false, not {value!r}")
        return BOOLEAN_WORDS[value.strip().lower()]
    if name == "tag_separator":
        if not value:
            raise ValueError(f"sources entry {entry!r}: tag_separator must not be empty")
        return value
    return value.strip()


def format_source_entry(value: dict[str, Any]) -> str:
    """A --config object {"source": ..., "repeat": ...} as the entry string it stands for."""
    if not isinstance(value.get("source"), str):
        raise ValueError(f"sources entry {value!r} needs a 'source' string")
    options = "&".join(f"{k}={v}" for k, v in value.items() if k != "source" and v is not None)
    return value["source"] + (SEPARATOR + options if options else "")


def mix_problems(entries: tuple[str, ...]) -> list[str]:
    """Sentence fragments for entries that do not parse, and for weights set on some sources only."""
    out, weighted = [], []
    for entry in entries:
        try:
            weighted.append(parse_source_entry(entry).weight is not None)
        except ValueError as e:
            out.append(str(e))
    if any(weighted) and not all(weighted):
        out.append("set weight= on every source of the mix or on none (then repeat= decides)")
    return out


def mixed_sources(cfg: DataConfig) -> list[SourceConfig]:
    """The sources a config reads: its `sources`, or `source` alone."""
    return [parse_source_entry(e) for e in cfg.sources] if cfg.sources else [SourceConfig(cfg.source)]


def expand_data_flags(args: list[str]) -> list[str]:
    """The `--data SPEC` shorthand: once, `--data.source SPEC`; given several times, one
    `--data.sources SPEC1 SPEC2 ...` (at the place of the first). Other arguments are kept as they are."""
    specs: list[str] = []
    out: list[str] = []
    first = -1
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--data" and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--data="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        first = len(out) if first < 0 else first
        specs.append(value)
    if not specs:
        return out
    flag = ["--data.source", specs[0]] if len(specs) == 1 else ["--data.sources", *specs]
    return out[:first] + flag + out[first:]
