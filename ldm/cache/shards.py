"""One rank's shard writer: bounded shards, each followed by a progress record that a resumed build reads.

A shard holds samples of one latent shape (one bucket: a batch of another shape closes the shard
before it), at most `samples_per_shard` of them and at most `max_shard_bytes` bytes of tensors
(at least one sample). Text embeddings are stored once per distinct caption per shard: the shard's
`text_hidden` is [V, L, D] and its index lists, per sample, the row of each caption variant
(`text_rows`), so a sample with three captions costs three embeddings unless they repeat.
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
from ldm.cache.encode import EncodedBatch

INDEX_FIELDS = ("keys", "captions", "caption_variants", "identities", "sources", "buckets", "original_sizes",
                "crop_top_left")
"""Per-sample lists of a shard's .json (and `text_rows` with text): see `ldm.cache.reader`."""


def progress_path(cache_dir: Path, rank: int) -> Path:
    return cache_dir / f"rank{rank:03d}.progress.json"


def _latent_shape(chunk: _Chunk) -> tuple[int, ...]:
    return tuple(chunk.tensors["latent_mean"].shape[1:])  # [C, h, w]


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8")


@dataclass
class _Chunk:
    """The samples of one batch not yet written, from `offset` on, and the loader position before that batch."""

    tensors: dict[str, torch.Tensor]
    index: dict[str, list[Any]]
    text: dict[str, torch.Tensor] | None  # the whole batch's {caption: [L, D]}, shared by its pieces
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
    """Finished shards: {"name", "num_samples", "num_texts", "latent_shape", "files": {name: {"bytes", "sha256"}}},
    resumed ones included."""
    streams: list[dict[str, Any]] | None = None
    """A bucketed or mixed build: the loader's sub-streams [{"source", "bucket", "shards"}], in its order."""
    _chunks: list[_Chunk] = field(default_factory=list)
    _after_last: dict[str, Any] | None = None  # loader position after the last batch added

    def add(self, encoded: EncodedBatch, batch: dict[str, Any], before: dict[str, Any], after: dict[str, Any], *,
            skip: int = 0, source: int = 0, bucket: tuple[int, int] | None = None) -> None:
        """One encoded batch of mix source `source` and `bucket` (W, H; None: square); `before`/`after`:
        the loader's state_dict around it; the first `skip` samples are stored already."""
        n = len(batch["keys"])
        index = {"keys": list(batch["keys"]), "captions": list(batch["captions"]),
                 "caption_variants": [list(v) for v in batch["caption_variants"]],
                 "identities": list(batch["identities"]), "sources": [source] * n,
                 "buckets": [None if bucket is None else list(bucket)] * n,
                 "original_sizes": batch["original_sizes"].tolist(), "crop_top_left": batch["crop_top_left"].tolist()}
        if "balance_values" in batch:  # --data.balance-by: each sample's value of that metadata field
            index["balance_values"] = list(batch["balance_values"])
        chunk = _Chunk({name: t[skip:] for name, t in encoded.latents.items()},
                       {name: values[skip:] for name, values in index.items()}, encoded.text, before, skip)
        pending = sum(map(len, self._chunks))
        if pending and len(chunk) and _latent_shape(self._chunks[-1]) != _latent_shape(chunk):
            self._write(pending)  # another bucket: a shard holds one latent shape
        self._chunks.append(chunk)
        self._after_last = after
        while self._chunks:
            pending, fit = sum(map(len, self._chunks)), self._fitting()
            if fit == pending and fit < self.samples_per_shard:
                break
            self._write(fit)

    def _fitting(self) -> int:
        """How many of the pending samples, from the first, fit in one shard (at least one)."""
        n, used, seen = 0, 0, set()
        for chunk in self._chunks:
            if not len(chunk):
                continue
            row_bytes = sum(t[0].numel() * t.element_size() for t in chunk.tensors.values())
            for variants in chunk.index["caption_variants"]:
                new = {c for c in variants if c not in seen} if chunk.text is not None else set()
                cost = row_bytes + sum(chunk.text[c].numel() * chunk.text[c].element_size() for c in new)  # type: ignore[index]
                if n == self.samples_per_shard or (n and used + cost > self.max_shard_bytes):
                    return n
                used, n = used + cost, n + 1
                seen |= new
        return n

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
                                {name: v[:k] for name, v in chunk.index.items()}, chunk.text, chunk.loader_state,
                                chunk.offset))
            if k == len(chunk):
                self._chunks.pop(0)
            else:
                self._chunks[0] = _Chunk({name: t[k:] for name, t in chunk.tensors.items()},
                                         {name: v[k:] for name, v in chunk.index.items()}, chunk.text,
                                         chunk.loader_state, chunk.offset + k)
            n -= k
        taken = [c for c in taken if len(c)]
        shard = {name: torch.cat([c.tensors[name] for c in taken]).contiguous() for name in taken[0].tensors}
        index = {name: [v for c in taken for v in c.index[name]] for name in INDEX_FIELDS}
        if "balance_values" in taken[0].index:  # every chunk of a build has them or none does
            index["balance_values"] = [v for c in taken for v in c.index["balance_values"]]
        if taken[0].text is not None:
            rows: dict[str, int] = {}  # caption -> its row in this shard's text table, first seen first
            embeddings = []
            for c in taken:
                for variants in c.index["caption_variants"]:
                    for caption in variants:
                        if caption not in rows:
                            rows[caption] = len(embeddings)
                            embeddings.append(c.text[caption])  # type: ignore[index]
            shard["text_hidden"] = torch.stack(embeddings).contiguous()  # [V, L, D]
            index["text_rows"] = [[rows[caption] for caption in variants] for variants in index["caption_variants"]]
        stem = f"rank{self.rank:03d}-{len(self.shards):05d}"
        files = {f"{stem}.safetensors": write_bytes_atomic(self.cache_dir / f"{stem}.safetensors",
                                                           safetensors_bytes(shard)),
                 f"{stem}.json": write_bytes_atomic(self.cache_dir / f"{stem}.json", json_bytes(index))}
        self.shards.append({"name": stem, "num_samples": len(index["keys"]),
                            "num_texts": len(shard["text_hidden"]) if "text_hidden" in shard else 0,
                            "latent_shape": list(shard["latent_mean"].shape[1:]), "files": files})
        self._record(finished=False)

    def _record(self, *, finished: bool) -> None:
        if finished or not self._chunks:
            resume = None if finished else {"loader": self._after_last, "skip": 0}
        else:
            resume = {"loader": self._chunks[0].loader_state, "skip": self._chunks[0].offset}
        write_bytes_atomic(progress_path(self.cache_dir, self.rank),
                           json_bytes({"rank": self.rank, "finished": finished, "shards": self.shards,
                                       "streams": self.streams, "resume": resume}))
