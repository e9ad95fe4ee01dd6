"""Split prepared shards into one shard folder per value of a metadata field (for mixing experiments).

    python benchmarks/split_by_field.py --data runs/demo/data/train --field category --out runs/sweep/by_category

Writes OUT/<value>/shard-*.tar + stats.json for every value, and prints each folder's size and a
`--data.sources` line that mixes them with equal weights (or weights proportional to size**power).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import DataConfig, open_records
from data.export import ExportConfig, write_shards, write_stats
from ldm.cli import parse_config


@dataclass(frozen=True)
class SplitConfig:
    data: str = "runs/demo/data/train"
    """The --data spec to split (prepared shards, a folder, ...)."""
    field: str = "category"
    """The metadata field whose values name the output folders."""
    out: str = "runs/sweep/by_category"
    """Parent of the per-value shard folders."""
    power: float = 0.0
    """Printed weights are size**power (0: equal shares per group, 1: the unmixed proportions)."""


def slug(value: object) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-") or "none"


def main(args: list[str] | None = None) -> dict[str, int]:
    cfg = parse_config(SplitConfig, {"default": SplitConfig()}, args, default_preset="default")
    data_cfg = DataConfig(source=cfg.data)
    groups: dict[str, list] = {}
    for record in open_records(data_cfg)[1]:
        groups.setdefault(slug(record.metadata.get(cfg.field)), []).append(record)
    sizes = {}
    for name, records in sorted(groups.items()):
        stats = write_shards(records, data_cfg, ExportConfig(), Path(cfg.out) / name)
        write_stats(Path(cfg.out) / name / "stats.json", stats.to_dict())
        sizes[name] = len(records)
    print(sizes)
    print(" ".join(f"{cfg.out}/{n}#weight={s ** cfg.power:.4g}" for n, s in sizes.items()))
    return sizes


if __name__ == "__main__":
    main()
