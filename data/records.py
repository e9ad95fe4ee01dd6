"""Raw records of any source in stored order: what prepare_data converts and `--validate` checks."""

from __future__ import annotations

from collections.abc import Iterator

from data.config import DataConfig
from data.loader import open_map_source
from data.sample import RawRecord
from data.shards import iter_shard_records
from data.spec import parse_source_spec


def open_records(cfg: DataConfig) -> tuple[int | None, Iterator[RawRecord]]:
    """(number of records if known without reading, iterator over every record of `cfg.source`)."""
    spec = parse_source_spec(cfg.source, allow_pipe_urls=cfg.allow_pipe_urls)
    if spec.kind == "webdataset":
        def shard_records() -> Iterator[RawRecord]:
            for location in spec.locations:
                yield from iter_shard_records(location, cfg)

        return None, shard_records()
    source = open_map_source(spec, cfg)
    return len(source), (source.record(i) for i in range(len(source)))
