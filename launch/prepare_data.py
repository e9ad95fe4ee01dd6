"""Turn any --data source into webdataset shards, check a source, or fetch the emoji demo set.

    python launch/prepare_data.py --data SPEC --out OUT            # shards + OUT/stats.json
    python launch/prepare_data.py --data SPEC --validate           # read and report, write nothing
    python launch/prepare_data.py --emoji OUT                      # demo set: OUT/train, OUT/val
    python launch/prepare_data.py --emoji OUT --emoji-captions variants   # ... with several captions per image

`--data SPEC` is short for `--data.source SPEC`; other source options are `--data.caption-column`,
`--data.missing-caption`, ... (see data/config.py). Rerunning a finished command does nothing; an
unfinished or differently configured output folder is rewritten.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # `python launch/prepare_data.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from data import DataConfig, open_records
from data import emoji as emoji_set
from data.export import ExportConfig, validate_records, write_shards, write_stats
from data.sample import RawRecord
from ldm.cli import parse_config, save_config, to_dict


@dataclass(frozen=True)
class PrepareDataConfig:
    """Convert a --data source into webdataset shards (or --validate it, or fetch --emoji)."""

    data: DataConfig = field(default_factory=DataConfig)
    """The source and how to read it (--data SPEC or --data.source SPEC, --data.caption-column, ...)."""
    out: str = ""
    """Output folder for shard-NNNNNN.tar and stats.json."""
    validate: bool = False
    """Only read and decode the source; print every bad sample and a summary; write nothing."""
    emoji: str = ""
    """Fetch the Noto emoji demo set (npm emoji-datasource-google 16.0.0) and prepare it in this folder."""
    emoji_captions: emoji_set.CaptionStyle = "name"
    """--emoji captions: name (the lower-cased Unicode name, skin tone appended) or variants (a list per training
    image, one picked per epoch: the name first, CLDR's "flag: x" for flags, the short names, the name with its
    subcategory and category: "heavy black heart", "heart", "heavy black heart, heart, smileys & emotion").
    Validation images keep the name either way."""
    download_dir: str = "downloads"
    """Where downloaded archives are cached (gitignored)."""
    image_format: Literal["png", "jpeg"] = "png"
    """How images are stored in the shards: png (lossless) or jpeg."""
    jpeg_quality: int = 95
    """JPEG quality (image_format jpeg only)."""
    max_side: int = 512
    """Longer-side limit of stored images; larger ones are downscaled, smaller ones kept as they are."""
    samples_per_shard: int = 1000
    """Samples per .tar shard."""
    shuffle_seed: int | None = 0
    """Write samples of an image folder / datasets source in this seeded random order (None: as stored).
    Shard sources are copied in their order."""


PRESETS = {"default": PrepareDataConfig(), "emoji": PrepareDataConfig(emoji="cache/emoji")}


def export_config(cfg: PrepareDataConfig) -> ExportConfig:
    return ExportConfig(cfg.image_format, cfg.jpeg_quality, cfg.max_side, cfg.samples_per_shard)


def settings_of(cfg: PrepareDataConfig) -> dict[str, Any]:
    """What decides the output's content: a finished folder is reused only if these match."""
    return {"data": to_dict(cfg.data), "export": asdict(export_config(cfg)), "shuffle_seed": cfg.shuffle_seed}


def is_complete(stats_path: Path, settings: dict[str, Any]) -> bool:
    if not stats_path.is_file():
        return False
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return bool(stats.get("complete")) and stats.get("settings") == settings


def shuffled(records: list[RawRecord], seed: int | None) -> list[RawRecord]:
    """Seeded order, so that every shard mixes the whole set (sources are often sorted by class)."""
    if seed is not None:
        records = list(records)
        random.Random(seed).shuffle(records)
    return records


def prepare(cfg: PrepareDataConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    settings = settings_of(cfg)
    if is_complete(out / "stats.json", settings):
        print(f"{out} is already prepared with these settings; nothing to do.")
        return json.loads((out / "stats.json").read_text(encoding="utf-8"))
    total, records = open_records(cfg.data)
    if cfg.shuffle_seed is not None and total is not None:
        order = list(range(total))
        random.Random(cfg.shuffle_seed).shuffle(order)
        records = _in_order(cfg.data, order)
    with tqdm(total=total, desc=f"prepare {cfg.data.source}", unit="img") as bar:
        stats = write_shards(records, cfg.data, export_config(cfg), out, progress=bar)
    result = {**stats.to_dict(), "settings": settings}
    save_config(cfg, out / "config.json")
    write_stats(out / "stats.json", result)
    _print_summary(stats.to_dict(), out)
    return result


def _in_order(data_cfg: DataConfig, order: list[int]) -> Any:
    """Records of a map source in the given index order (random access, nothing held in memory)."""
    from data.loader import open_map_source
    from data.spec import parse_source_spec

    source = open_map_source(parse_source_spec(data_cfg.source), data_cfg)
    return (source.record(i) for i in order)


def validate(cfg: PrepareDataConfig) -> dict[str, Any]:
    total, records = open_records(cfg.data)

    def report(reason: str, key: str, origin: str, message: str) -> None:
        tqdm.write(f"bad sample\t{reason}\t{key}\t{origin}\t{message}")

    with tqdm(total=total, desc=f"validate {cfg.data.source}", unit="img") as bar:
        stats = validate_records(records, cfg.data, progress=bar, report=report).to_dict()
    summary = {"source": cfg.data.source, "samples_seen": stats["samples_seen"],
               "samples_usable": stats["samples_written"], "skipped": stats["skipped"]}
    print(json.dumps(summary, indent=2))
    return summary


def prepare_emoji(cfg: PrepareDataConfig) -> dict[str, Any]:
    """Download (cached, sha512-checked) and write OUT/train and OUT/val shards plus OUT/stats.json."""
    out = Path(cfg.emoji)
    data_cfg = cfg.data.replace(source=f"npm:{emoji_set.PACKAGE}@{emoji_set.VERSION}", missing_caption="skip")
    settings = {**settings_of(PrepareDataConfig(data=data_cfg, max_side=cfg.max_side, image_format=cfg.image_format,
                                                jpeg_quality=cfg.jpeg_quality, samples_per_shard=cfg.samples_per_shard,
                                                shuffle_seed=cfg.shuffle_seed)),
                "integrity": emoji_set.INTEGRITY, "split": emoji_set.SPLIT_RULE,
                # Only when not the default, so folders prepared before the option existed stay complete.
                **({"emoji_captions": cfg.emoji_captions} if cfg.emoji_captions != "name" else {})}
    if is_complete(out / "stats.json", settings):
        print(f"{out} already holds the prepared emoji set; nothing to do.")
        return json.loads((out / "stats.json").read_text(encoding="utf-8"))
    start = time.perf_counter()
    tarball = emoji_set.fetch_tarball(Path(cfg.download_dir))
    train, val = emoji_set.emoji_records(*emoji_set.read_package(tarball), captions=cfg.emoji_captions)
    result: dict[str, Any] = {"settings": settings, "license": emoji_set.LICENSE_NOTE, "tarball": str(tarball)}
    for split, records in (("train", train), ("val", val)):
        records = shuffled(records, cfg.shuffle_seed)
        with tqdm(total=len(records), desc=f"emoji {split}", unit="img") as bar:
            stats = write_shards(records, data_cfg, export_config(cfg), out / split, progress=bar)
        result[split] = stats.to_dict()
        _print_summary(result[split], out / split)
    result["seconds"] = round(time.perf_counter() - start, 1)
    save_config(cfg, out / "config.json")
    write_stats(out / "stats.json", result)
    return result


def _print_summary(stats: dict[str, Any], out: Path) -> None:
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(stats["skipped"].items())) or "none"
    print(f"{out}: {stats['samples_written']} of {stats['samples_seen']} samples written in "
          f"{len(stats['shards'])} shard(s); skipped {skipped}.")


def main(args: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(PrepareDataConfig, PRESETS, args, default_preset="default")  # --data SPEC shorthand too
    if cfg.emoji:
        return prepare_emoji(cfg)
    if not cfg.data.source:
        raise SystemExit("Give a source with --data SPEC (or --emoji OUT for the demo set).")
    if cfg.validate:
        return validate(cfg)
    if not cfg.out:
        raise SystemExit("Give an output folder with --out OUT (or --validate to only check the source).")
    return prepare(cfg)


if __name__ == "__main__":
    main()
