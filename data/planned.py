"""Batches drawn from sub-streams by a schedule: aspect-ratio buckets and several sources mixed.

A *sub-stream* is one (source, bucket) pair: the indices of a map-style source whose images fall in
that bucket, or the shards of a source that hold that bucket (data/buckets.py, bucketed shards).
Every batch comes from one sub-stream, so it holds one bucket and one source.

The schedule (the same on every process): schedule epoch E is a list of sub-stream ids, sub-stream k
appearing `counts[k]` times, shuffled by (seed, E). `counts` follow each source's repeat (k's
samples per process / batch size x repeat) or weight (the source's share of one epoch's batches,
split over its buckets by size), so buckets are visited in proportion to their size and the mix is
exact per schedule epoch. Step t is entry t mod L of epoch t // L. All processes step through the
same list, so at every step every process holds a batch of the same bucket and source.

Reading: process r's share of sub-stream k in its epoch e is every W-th entry of k's permutation
seeded by (seed, k, e), wrapping around so every process gets ceil(n_k / W) entries (a sub-stream
smaller than W repeats a few samples). `lanes` parallel readers split that share again the same
way; lane j makes the batches of steps j, j + lanes, ...: it draws from sub-stream k until it has a
full batch (a bad sample is counted and the next one drawn), so batches are always full and a
lane's position {"step", "streams": {k: position}} is all it needs to resume. Worker w of K serves
lanes w, w + K, ... and items come out round robin over lanes, so the order depends on the lane
count only (as for plain shards, data/stream.py).

Sub-streams keep their own epochs: a small bucket is re-permuted more often than a large one. So do
lanes: lanes reach the end of their part of a permutation at different steps, so a sample may come
round again on one lane before another lane has read all of its part (every sample of a part is
read once per sub-epoch of its lane; across lanes and ranks the parts of one permutation are
disjoint). Shard sub-streams of one source share its shuffle block (split over its buckets), so a
lane buffers about one block whatever the number of buckets.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from data.buckets import bucket_name
from data.config import DataConfig
from data.stream import (MapSource, ShardPlan, collate, derived_seed, interleave, lane_shard_items, process_record,
                         worker_lanes)

# A lane that draws this many samples beyond a batch without filling it reports the sub-stream dead.
MAX_EXTRA_DRAWS = 10_000


@dataclass
class SubStream:
    """One (source, bucket) pair. Exactly one of `indices` (map source) and `shards` is set."""

    source: int
    bucket: tuple[int, int] | None
    size: int
    """Samples in it (for shards: counted from stats.json or the tar headers)."""
    indices: np.ndarray | None = None
    shards: tuple[str, ...] | None = None


def deal(items: np.ndarray, part: int, parts: int) -> np.ndarray:
    """Entries part, part + parts, ... wrapping around, so every part gets ceil(n / parts) entries."""
    n = len(items)
    return items[(part + np.arange(math.ceil(n / parts)) * parts) % n] if n else items


def batch_counts(streams: list[SubStream], repeats: list[float], weights: list[float] | None,
                 batch_size: int, world_size: int) -> list[int]:
    """How often each sub-stream appears in one schedule epoch (see the module docstring)."""
    batches = [math.ceil(s.size / world_size) / batch_size for s in streams]  # one pass, per process
    if weights is None:
        return [max(1, round(b * repeats[s.source])) if s.size and repeats[s.source] > 0 else 0
                for s, b in zip(streams, batches)]
    total = max(len(weights), round(sum(batches)))
    counts = [0] * len(streams)
    for source, weight in enumerate(weights):
        mine = [k for k, s in enumerate(streams) if s.source == source and s.size]
        if not mine:
            continue
        quota = max(1, round(total * weight / sum(weights)))
        shares = [quota * batches[k] / sum(batches[i] for i in mine) for k in mine]
        floors = [math.floor(x) for x in shares]
        # largest remainder: the sub-streams with the biggest fractions get the leftover batches
        for i in sorted(range(len(mine)), key=lambda i: floors[i] - shares[i])[: quota - sum(floors)]:
            floors[i] += 1
        for k, c in zip(mine, floors):
            counts[k] = c
    return counts


def schedule_epoch(counts: list[int], seed: int, epoch: int) -> list[int]:
    order = [k for k, c in enumerate(counts) for _ in range(c)]
    random.Random(derived_seed(seed, "schedule", epoch)).shuffle(order)
    return order


@dataclass
class Schedule:
    """The sub-stream of every step (the module docstring); also what the latent cache's loader follows."""

    counts: list[int]
    seed: int

    def __post_init__(self) -> None:
        self._epoch: tuple[int, list[int]] | None = None

    def stream_at(self, step: int) -> int:
        epoch, offset = divmod(step, sum(self.counts))
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, schedule_epoch(self.counts, self.seed, epoch))
        return self._epoch[1][offset]


def map_identity(source: int, index: int) -> str:
    """What seeds the draws (crop, flip, caption choice) of a map source's sample in a mix or bucket."""
    return f"{source}/{index}"


def stream_part(indices: np.ndarray, seed: int, k: int, epoch: int, rank: int, world_size: int, lane: int,
                lanes: int) -> np.ndarray:
    """The entries of sub-stream k (its `indices`) that `lane` of `lanes` on `rank` reads in k's `epoch`.

    Only len(indices) decides the permutation, so a latent cache that lists its rows in the order of
    the source's indices reads them in the same order as the images are read uncached."""
    order = np.random.default_rng(derived_seed(seed, "stream", k, epoch)).permutation(indices)
    return deal(deal(order, rank, world_size), lane, lanes)


@dataclass
class PlannedStream(IterableDataset):
    """Batches of one sub-stream each, following the schedule; `positions[lane]` as in the docstring."""

    streams: list[SubStream]
    sources: list[MapSource | None]
    """Per source of the mix: its map source, or None for shards."""
    cfgs: list[DataConfig]
    counts: list[int]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    positions: list[dict[str, Any]]
    next_lane: int = 0
    endless: bool = True

    def __post_init__(self) -> None:
        super().__init__()
        self._schedule = Schedule(self.counts, self.seed)
        self._plans = {k: ShardPlan.make(s.shards, self.world_size, len(self.positions))
                       for k, s in enumerate(self.streams) if s.shards is not None}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lanes = worker_lanes(self.next_lane, len(self.positions))
        yield from interleave([self._lane(lane) if self.endless else self._finite_lane(lane) for lane in lanes])

    def stream_at(self, step: int) -> int:
        return self._schedule.stream_at(step)

    # ----- endless: full batches in schedule order -------------------------------------------------

    def _lane(self, lane: int) -> Iterator[dict[str, Any]]:
        step = self.positions[lane]["step"]
        streams = {int(k): list(v) for k, v in self.positions[lane]["streams"].items()}
        readers: dict[int, Iterator[tuple[dict[str, Any], list[int]]]] = {}
        while True:
            k = self.stream_at(step)
            if k not in readers:
                readers[k] = self._reader(k, lane, streams.get(k, [0, 0, 0, 0]))
            samples, bad, draws = [], [], 0
            while len(samples) < self.batch_size:
                item, streams[k] = next(readers[k])
                draws += 1
                if "sample" in item:
                    samples.append(item["sample"])
                elif "bad" in item:
                    bad.append([*item["bad"], item["key"], item["origin"]])
                if draws > self.batch_size + MAX_EXTRA_DRAWS:
                    yield {"lane": lane, "error": self._dead(k)}
                    return
            step += len(self.positions)
            yield {"batch": collate(samples), "stream": k, "bad": bad, "lane": lane,
                   "position": {"step": step, "streams": {str(i): list(p) for i, p in streams.items()}}}

    def _reader(self, k: int, lane: int, position: list[int]) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """Sub-stream k's items for this lane from `position` on, each with the position after it."""
        stream = self.streams[k]
        cfg = self.cfgs[stream.source]
        if stream.shards is not None:
            yield from lane_shard_items(self._plans[k], cfg, derived_seed(self.seed, "stream", k), self.rank,
                                        self.world_size, len(self.positions), lane, position, True, stream.bucket)
            return
        epoch, offset = position[0], position[1]
        source = self.sources[stream.source]
        while True:
            part = stream_part(stream.indices, self.seed, k, epoch, self.rank, self.world_size, lane,  # type: ignore[arg-type]
                               len(self.positions))
            for offset in range(offset, len(part)):
                index = int(part[offset])
                identity = map_identity(stream.source, index)
                item = process_record(source.record(index), cfg, self.seed, epoch, identity, True, stream.bucket)  # type: ignore[union-attr]
                yield item, [epoch, offset + 1, 0, 0]
            epoch, offset = epoch + 1, 0

    def _dead(self, k: int) -> str:
        stream = self.streams[k]
        return (f"--data source {self.cfgs[stream.source].source!r}, bucket {stream.bucket}: {MAX_EXTRA_DRAWS} samples "
                "in a row were unusable; check it with `python -m launch.prepare_data --data SPEC --validate`.")

    # ----- finite: every sample once, in stored order, grouped by sub-stream --------------------------

    def _finite_lane(self, lane: int) -> Iterator[dict[str, Any]]:
        """Batches of the next `batch_size` records (bad ones dropped, so a batch may be short or
        None); position {"stream": k, "at": position in k's part} after each, for a resumed pass."""
        start = self.positions[lane]
        for k in range(start["stream"], len(self.streams)):
            at = start["at"] if k == start["stream"] else [0, 0, 0, 0]
            samples, bad, records, position = [], [], 0, at
            for item, position in self._finite_items(k, lane, at):
                if "sample" in item:
                    samples.append(item["sample"])
                elif "bad" in item:
                    bad.append([*item["bad"], item["key"], item["origin"]])
                records += "empty" not in item
                if records == self.batch_size:
                    yield self._finite_batch(k, samples, bad, lane, {"stream": k, "at": position})
                    samples, bad, records = [], [], 0
            if records:
                yield self._finite_batch(k, samples, bad, lane, {"stream": k, "at": position})

    def _finite_items(self, k: int, lane: int, at: list[int]) -> Iterator[tuple[dict[str, Any], list[int]]]:
        stream, lanes = self.streams[k], len(self.positions)
        cfg = self.cfgs[stream.source]
        if stream.shards is not None:
            yield from lane_shard_items(self._plans[k], cfg, 0, self.rank, self.world_size, lanes, lane, at, False,
                                        stream.bucket)
            return
        source = self.sources[stream.source]
        mine = stream.indices[self.rank :: self.world_size][lane::lanes]  # type: ignore[index]
        for i in range(at[1], len(mine)):
            index = int(mine[i])
            identity = map_identity(stream.source, index)  # as in training, so a cache stores the training identity
            yield process_record(source.record(index), cfg, 0, 0, identity, False, stream.bucket), [0, i + 1, 0, 0]  # type: ignore[union-attr]

    @staticmethod
    def _finite_batch(k: int, samples: list, bad: list, lane: int, position: dict[str, Any]) -> dict[str, Any]:
        return {"batch": collate(samples) if samples else None, "stream": k, "bad": bad, "lane": lane,
                "position": position}


def bucket_histogram(streams) -> dict[str, int]:
    """Samples per bucket ("square" when unbucketed) over sub-streams with ``bucket`` and ``size``."""
    out: dict[str, int] = {}
    for s in streams:
        name = "square" if s.bucket is None else bucket_name(s.bucket)
        out[name] = out.get(name, 0) + s.size
    return out
