"""One rank's shard writer: bounded shards, each followed by a progress record that a resumed build reads.

A shard holds at most `samples_per_shard` samples and at most `max_shard_bytes` bytes of tensors
(every sample has the same tensor shapes, so the bound is a sample count fixed by the first batch).
After each shard, `rankRRR.progress.json` is rewritten atomically with the finished shards (sizes and
sha256) and the resume point of the first sample not yet in a shard: the data loader's position
before that sample's batch, and how many of that batch's samples are already stored. A resumed build
re-reads and re-encodes that whole batch (so every sample is encoded in the same batch as in an
uninterrupted build, and the shards come out byte for byte the same) and drops the stored ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from foundation import write_bytes_atomic

INDEX_FIELDS = ("keys", "captions", "original_sizes")


def progress_path(cache_dir: Path, rank: int) -> Path:
    return cache_dir / f"rank{rank:03d}.progress.json"


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8")


@dataclass
class _Chunk:
    """The samples of one batch not yet written, from `offset` on, and the loader position before that batch."""

    tensors: dict[str, torch.Tensor]
    index: dict[str, list[Any]]
    loader_state: dict[str, Any]
    offset: int

    def __len__(self) -> int:
        return len(self.index["keys"])


@dataclass
class ShardWriter:
    """Collects one rank's encoded batches and writes a shard whenever the bound is reached."""

    cache_dir: Path
    rank: int
    samples_per_shard: int
    max_shard_bytes: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    """Finished shards: {"name", "num_samples", "files": {name: {"bytes", "sha256"}}}, resumed ones included."""
    _chunks: list[_Chunk] = field(default_factory=list)
    _after_last: dict[str, Any] | None = None  # loader position after the last batch added

    def add(self, tensors: dict[str, torch.Tensor], batch: dict[str, Any], before: dict[str, Any],
            after: dict[str, Any], *, skip: int = 0) -> None:
        """One encoded batch; `before`/`after`: the loader's state_dict around it; the first `skip` are stored."""
        index = {"keys": list(batch["keys"]), "captions": list(batch["captions"]),
                 "original_sizes": batch["original_sizes"].tolist()}
        tensors = {name: t[skip:] for name, t in tensors.items()}
        index = {name: values[skip:] for name, values in index.items()}
        self._chunks.append(_Chunk(tensors, index, before, skip))
        self._after_last = after
        while sum(map(len, self._chunks)) >= self.shard_limit():
            self._write(self.shard_limit())

    def shard_limit(self) -> int:
        """Samples per shard: the count bound, or fewer where the byte bound is hit first (at least one)."""
        if not self._chunks:
            return self.samples_per_shard
        per_sample = sum(t[0].numel() * t.element_size() for t in self._chunks[0].tensors.values() if len(t))
        return max(1, min(self.samples_per_shard, self.max_shard_bytes // max(1, per_sample)))

    def finish(self) -> None:
        """Write what is left as a last, shorter shard, and mark this rank's share as finished."""
        left = sum(map(len, self._chunks))
        if left:
            self._write(left)
        self._record(finished=True)

    def _write(self, n: int) -> None:
        taken: list[_Chunk] = []
        while n:
            chunk = self._chunks[0]
            k = min(n, len(chunk))
            taken.append(_Chunk({name: t[:k] for name, t in chunk.tensors.items()},
                                {name: v[:k] for name, v in chunk.index.items()}, chunk.loader_state, chunk.offset))
            if k == len(chunk):
                self._chunks.pop(0)
            else:
                self._chunks[0] = _Chunk({name: t[k:] for name, t in chunk.tensors.items()},
                                         {name: v[k:] for name, v in chunk.index.items()},
                                         chunk.loader_state, chunk.offset + k)
            n -= k
        shard = {name: torch.cat([c.tensors[name] for c in taken]).contiguous() for name in taken[0].tensors}
        index = {name: [v for c in taken for v in c.index[name]] for name in INDEX_FIELDS}
        stem = f"rank{self.rank:03d}-{len(self.shards):05d}"
        files = {f"{stem}.safetensors": write_bytes_atomic(self.cache_dir / f"{stem}.safetensors",
                                                           safetensors_bytes(shard)),
                 f"{stem}.json": write_bytes_atomic(self.cache_dir / f"{stem}.json", json_bytes(index))}
        self.shards.append({"name": stem, "num_samples": len(index["keys"]), "files": files})
        self._record(finished=False)

    def _record(self, *, finished: bool) -> None:
        if finished or not self._chunks:
            resume = None if finished else {"loader": self._after_last, "skip": 0}
        else:
            resume = {"loader": self._chunks[0].loader_state, "skip": self._chunks[0].offset}
        write_bytes_atomic(progress_path(self.cache_dir, self.rank),
                           json_bytes({"rank": self.rank, "finished": finished, "shards": self.shards,
                                       "resume": resume}))
