"""`CacheSpec`: everything that decides what a latent cache holds and how it is built, and its key.

One frozen object goes from the training script to `ensure_cache`, `build_cache` and the shard
writer, and its key (`CacheSpec.key`) is computed once, on first use. The key is what a cache must
have been built with to be reused (see `ldm.cache.check`):

    format        the on-disk format this code reads
    vae           the autoencoder's fingerprint
    text_encoder  the text encoder's fingerprint, or None when this run encodes text on the fly
    data          every DataConfig field that changes what a sample looks like (DATA_FIELDS_NOT_KEYED),
                  the buckets among them, and the sources of a mix with their per-source options, but
                  not their weights or repeats (how often a source is drawn is decided when training)
    data_files    a cheap fingerprint of the data's files (`ldm.cache.data_files`), or None if unchecked
    dtype         storage dtypes of latents and text embeddings

The frozen encoders' precision is in their own fingerprints (the autoencoder's `encode_dtype` from
`autoencoder.frozen.FrozenEncoder.fingerprint`, the text encoder's `dtype`), so it is keyed too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch

import data
from data.mix import parse_source_entry
from ldm.cache.data_files import data_files_fingerprint

CACHE_FORMAT = "ldm-latent-cache/3"  # 3: every caption variant, buckets, mixes
StorageDtype = Literal["float32", "bfloat16", "float16"]
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}
# DataConfig fields that cannot change a cached sample: how failures are budgeted, how an endless
# stream is shuffled, where `datasets` keeps its own cache, and whether shell URLs may run. `crop`
# is excluded because a cache always crops the centre. Every other field, including ones added
# later, is part of the key, so a new pixel-changing option is never silently ignored.
DATA_FIELDS_NOT_KEYED = ("crop", "cache_dir", "max_bad_fraction", "bad_fraction_min_seen", "shuffle_block",
                         "allow_pipe_urls", "balance_power")
# `balance_by` is keyed (the cache stores that field's value of every sample), but only when set, so
# caches built before the option existed keep their key.


@dataclass(frozen=True)
class CacheSpec:
    """What to cache, where, and how to build and read it. `key` is derived from it, once."""

    data: data.DataConfig
    """The training data; the fields that change a sample are keyed (not crop: a cache holds centre crops)."""
    cache_dir: Path
    """A folder every process sees; created if missing."""
    vae_fingerprint: dict[str, Any]
    """The autoencoder's identity (non-empty, JSON-ready), e.g. its weights' sha256 and config."""
    text_fingerprint: dict[str, Any] | None = None
    """The text encoder's fingerprint when text embeddings are cached; None: this run encodes text on the fly."""
    latent_dtype: StorageDtype = "float32"
    """Storage dtype of the posterior mean and std (small: 4x16x16 per view at 64 px)."""
    text_dtype: StorageDtype = "bfloat16"
    """Storage dtype of the text hidden states (77x768 per sample for CLIP: fp32 doubles the cache)."""
    check_data_files: bool = True
    """Key the data's file names, sizes and mtimes, so data edited in place is refused (one stat per file)."""
    batch_size: int = 32
    """Images per encoder call while building."""
    samples_per_shard: int = 1024
    """At most this many samples per shard file..."""
    max_shard_bytes: int = 256 << 20
    """...and at most this many bytes of tensors (a shard always holds at least one sample)."""
    num_workers: int = 0
    """DataLoader workers decoding images while the main process encodes."""
    verify_sha256: bool | None = None
    """Hash every shard when opening (reads the whole cache); None: for caches up to 16 GB, sizes only beyond."""
    in_memory: bool | None = None
    """Load every shard into memory (True), stream rows from memory-mapped shards (False), or pick by size."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        problems = []
        if not isinstance(self.vae_fingerprint, dict) or not self.vae_fingerprint:
            problems.append("vae_fingerprint must be the autoencoder's fingerprint as a non-empty dict")
        for name in ("latent_dtype", "text_dtype"):
            if getattr(self, name) not in STORAGE_DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {sorted(STORAGE_DTYPES)}")
        for name in ("batch_size", "samples_per_shard", "max_shard_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.num_workers < 0:
            problems.append(f"num_workers={self.num_workers} must be >= 0")
        if problems:
            raise ValueError("Invalid latent cache spec: " + "; ".join(problems) + ".")

    @property
    def with_text(self) -> bool:
        return self.text_fingerprint is not None

    def torch_dtype(self, part: Literal["latent", "text"]) -> torch.dtype:
        return STORAGE_DTYPES[self.latent_dtype if part == "latent" else self.text_dtype]

    @cached_property
    def key(self) -> dict[str, Any]:
        """JSON-ready; pass it to `open_cache` / `cache_is_valid`. The data files are stat'ed here, once."""
        return {"format": CACHE_FORMAT, "vae": json_ready(self.vae_fingerprint),
                "text_encoder": None if self.text_fingerprint is None else json_ready(self.text_fingerprint),
                "data": data_key(self.data),
                "data_files": data_files_fingerprint(self.data) if self.check_data_files else None,
                "dtype": {"latents": self.latent_dtype, "text": self.text_dtype}}

    def replace(self, **changes: Any) -> CacheSpec:
        return dataclasses.replace(self, **changes)


def data_key(data_cfg: data.DataConfig) -> dict[str, Any]:
    """The DataConfig fields that change cached pixels or captions, JSON-ready (tuples as lists); a
    mix's sources as their specs and per-source options, without weight and repeat."""
    fields = dataclasses.asdict(data_cfg)
    key = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if k not in DATA_FIELDS_NOT_KEYED}
    if key.get("balance_by") is None:
        key.pop("balance_by", None)
    key["sources"] = [{name: value for name, value in dataclasses.asdict(entry).items()
                       if name not in ("weight", "repeat") and value is not None}
                      for entry in map(parse_source_entry, data_cfg.sources)]
    return key


def json_ready(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value))  # tuples become lists, so a key compares equal after a round trip

