"""The data layer: captioned images from an image folder, a `datasets` dataset or webdataset shards,
decoded safely into one sample format, split per process, resumable exactly.

Public API (see docs/ARCHITECTURE.md, `data/`):
    DataConfig, build_loader, iterate_once, CaptionedLoader, PlannedLoader (buckets, mixed sources),
    SourceConfig, parse_source_spec, open_records, resolve_buckets, TooManyBadSamples, DataConfigError,
    BadSample
"""

from data.bad_samples import TooManyBadSamples
from data.buckets import resolve_buckets
from data.config import DataConfig, DataConfigError
from data.decode import BadSample
from data.keys import key_to_filename, shard_key
from data.loader import CaptionedLoader, build_loader, iterate_once
from data.mix import SourceConfig
from data.planned_loader import PlannedLoader
from data.records import open_records
from data.spec import SourceSpec, parse_source_spec

__all__ = [
    "BadSample",
    "CaptionedLoader",
    "DataConfig",
    "DataConfigError",
    "PlannedLoader",
    "SourceConfig",
    "SourceSpec",
    "TooManyBadSamples",
    "build_loader",
    "iterate_once",
    "key_to_filename",
    "open_records",
    "parse_source_spec",
    "resolve_buckets",
    "shard_key",
]
