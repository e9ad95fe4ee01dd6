"""Deterministic per-rank sample streams that DataLoader workers decode in parallel.

Both streams yield items in an order fixed by (seed, rank, world_size) and the start position, and
tag every item with the position *after* it, so the main process knows the exact resume point of
everything it has consumed (prefetched items do not count).

Map-style sources (image folders, `datasets`): epoch e is a permutation of all indices seeded by
(seed, e); rank r takes every world_size-th index of it, cut to N // world_size, so every rank has
the same share. Position = count of indices this rank has passed. Worker w of K takes positions
start + w, start + w + K, ...: the DataLoader's in-order round robin rebuilds the exact sequence,
whatever K is.

Shards: a shard (or, when shards are fewer than world_size x lanes, a slice: every m-th sample of
it) is a *unit*. Each epoch the units are shuffled by (seed, e), dealt to ranks, then to `lanes`
(parallel readers per rank). A lane reads its units in blocks of `shuffle_block` samples shuffled
within the block. Items come out round robin over lanes; worker w of K serves lanes w, w + K, ...
(K divides the lane count), so the order depends on the lane count only. A lane's position is
[epoch, unit slot, block, offset in block]; resuming re-reads the block and skips the offset.
"""

from __future__ import annotations

import json
import math
import random
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from foundation import derived_seed
from data.captions import caption_variants
from data.config import DataConfig
from data.decode import BadSample
from data.sample import RawRecord, make_sample, sample_draws
from data.shards import iter_shard_records, shard_name


class MapSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def record(self, index: int) -> RawRecord: ...


def process_record(record: RawRecord, cfg: DataConfig, draws_seed: int, epoch: int, identity: int | str, augment: bool,
                   bucket: tuple[int, int] | None = None) -> dict[str, Any]:
    """A stream item without its position: {"sample": ...} or {"bad": (reason, message), key, origin}."""
    try:
        draws = sample_draws(draws_seed, epoch, identity)
        sample = make_sample(record, cfg, draws, augment=augment, bucket=bucket)
        # What the latent cache stores so that a cached run can pick captions as this path does.
        sample["identity"] = str(identity)
        sample["caption_variants"] = caption_variants(record.caption, missing=cfg.missing_caption)
        if cfg.balance_by is not None:  # the latent cache stores it; the cached loader weights by it
            sample["balance_value"] = balance_value(record.metadata, cfg.balance_by)
        return {"sample": sample}
    except BadSample as e:
        return {"bad": (e.reason, e.message), "key": record.key, "origin": record.origin}
    except Exception as e:  # one odd file must not end a days-long run; counted and budgeted instead
        where = traceback.format_exc(limit=-2).strip().replace("\n", " | ")  # the innermost frames, for bug reports
        return {"bad": (f"unexpected_{type(e).__name__}", where), "key": record.key, "origin": record.origin}


def balance_value(metadata: dict[str, Any], name: str) -> str | None:
    """The sample's value of metadata field `name` as a string (None when it has none): what
    `--data.balance-by` counts. Lists and dicts are compared by their JSON text."""
    value = metadata.get(name)
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def worker_lanes(next_lane: int, lanes: int) -> list[int]:
    """The lanes this DataLoader worker reads: worker w of W takes next_lane + w, + w + W, ..."""
    worker, num_workers = _worker_slot()
    return [(next_lane + worker + j * num_workers) % lanes for j in range(lanes // num_workers)]


def interleave(readers: list[Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """One item from each reader in turn until every reader is exhausted."""
    readers = list(readers)
    while readers:
        for reader in list(readers):
            item = next(reader, None)
            if item is None:
                readers.remove(reader)
            else:
                yield item


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass
class IndexStream(IterableDataset):
    """Stream over a map-style source; `start` is this rank's position (see module docstring)."""

    source: MapSource
    cfg: DataConfig
    seed: int
    rank: int
    world_size: int
    start: int = 0
    endless: bool = True

    def __post_init__(self) -> None:
        super().__init__()
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def share_size(self) -> int:
        n = len(self.source)
        return n // self.world_size if self.endless else len(range(self.rank, n, self.world_size))

    def index_at(self, position: int) -> tuple[int, int]:
        """(epoch, dataset index) of this rank's `position`."""
        share = self.share_size()
        epoch, offset = divmod(position, share)
        if not self.endless:
            return 0, self.rank + offset * self.world_size
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng(derived_seed(self.seed, "epoch", epoch)).permutation(len(self.source))
            self._epoch_cache = (epoch, order[self.rank :: self.world_size][:share])
        return epoch, int(self._epoch_cache[1][offset])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_slot()
        position = self.start + worker
        limit = math.inf if self.endless else self.share_size()
        while position < limit:
            epoch, index = self.index_at(position)
            item = process_record(self.source.record(index), self.cfg, self.seed, epoch, index, self.endless)
            item["position"] = position + 1
            yield item
            position += num_workers


@dataclass(frozen=True)
class ShardPlan:
    """How shards split into units and units into ranks and lanes, per epoch."""

    shards: tuple[str, ...]
    slices: int

    @staticmethod
    def make(shards: tuple[str, ...], world_size: int, lanes: int) -> ShardPlan:
        return ShardPlan(shards, max(1, math.ceil(world_size * lanes / len(shards))))

    def lane_units(self, *, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int, lanes: int, lane: int) -> list[int]:
        units = list(range(len(self.shards) * self.slices))
        if shuffle:
            random.Random(derived_seed(seed, "units", epoch)).shuffle(units)
        return units[rank::world_size][lane::lanes]


@dataclass
class ShardStream(IterableDataset):
    """Stream over shards; `positions[lane]` = [epoch, slot, block, offset], `next_lane` goes first."""

    plan: ShardPlan
    cfg: DataConfig
    seed: int
    rank: int
    world_size: int
    positions: list[list[int]]
    next_lane: int = 0
    endless: bool = True

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from interleave([self._lane(lane) for lane in worker_lanes(self.next_lane, len(self.positions))])

    def _lane(self, lane: int) -> Iterator[dict[str, Any]]:
        for item, position in lane_shard_items(self.plan, self.cfg, self.seed, self.rank, self.world_size,
                                               len(self.positions), lane, self.positions[lane], self.endless):
            item.update(lane=lane, position=position)
            yield item


def lane_shard_items(plan: ShardPlan, cfg: DataConfig, seed: int, rank: int, world_size: int, lanes: int, lane: int,
                     position: list[int], endless: bool, bucket: tuple[int, int] | None = None,
                     ) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """One lane's items from `position` [epoch, slot, block, offset] on, each with the position after
    it; an {"empty": True} item marks the end of each unit (so a lane of empty shards still moves)."""
    epoch, slot, block, offset = position
    while True:
        units = plan.lane_units(epoch=epoch, seed=seed, shuffle=endless, rank=rank, world_size=world_size,
                                lanes=lanes, lane=lane)
        for slot in range(slot, len(units)):
            for item, (block, offset) in unit_items(plan, cfg, seed, units[slot], epoch, block, offset, endless, bucket):
                yield item, [epoch, slot, block, offset]
            block, offset = 0, 0
            yield {"empty": True}, [epoch, slot + 1, 0, 0]
        if not endless:
            return
        epoch, slot = epoch + 1, 0


def unit_items(plan: ShardPlan, cfg: DataConfig, seed: int, unit: int, epoch: int, first_block: int, offset: int,
               endless: bool, bucket: tuple[int, int] | None = None) -> Iterator[tuple[dict[str, Any], tuple[int, int]]]:
    """Items of one unit from (first_block, offset), each with the (block, offset) after it."""
    shard = plan.shards[unit // plan.slices]
    records = _sliced(iter_shard_records(shard, cfg), unit % plan.slices, plan.slices)
    size = cfg.shuffle_block if endless else 1
    for block, chunk in enumerate(_blocks(records, size)):
        if block < first_block:
            continue
        order = list(range(len(chunk)))
        if endless:
            random.Random(derived_seed(seed, "block", epoch, unit, block)).shuffle(order)
        for i in range(offset if block == first_block else 0, len(chunk)):
            record = chunk[order[i]]
            identity = f"{shard_name(record.origin)}/{record.key}"
            item = process_record(record, cfg, seed, epoch, identity, endless, bucket)
            yield item, (block, i + 1)


def _sliced(records: Iterator[RawRecord], k: int, m: int) -> Iterator[RawRecord]:
    """Every m-th record starting at k; records that report a shard problem go to slice 0 only."""
    for n, record in enumerate(records):
        if record.problem is not None and record.problem[0] in ("unreadable_shard", "truncated_shard"):
            if k == 0:
                yield record
        elif n % m == k:
            yield record


def _blocks(records: Iterator[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    chunk: list[RawRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> the batch contract: pixel_values [B, 3, H, W], captions, keys, original_sizes [B, 2]
    (H, W), crop_top_left [B, 2] (top, left in the resized image, before cropping); for the latent
    cache also identities (what seeds each sample's draws) and caption_variants (every caption each
    sample can get, `data.captions.caption_variants`); with --data.balance-by, balance_values (each sample's value
    of that metadata field, `balance_value`)."""
    return {
        "pixel_values": torch.stack([s["image"] for s in samples]).contiguous(),
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "identities": [s["identity"] for s in samples],
        "caption_variants": [s["caption_variants"] for s in samples],
        **({"balance_values": [s["balance_value"] for s in samples]} if samples and "balance_value" in samples[0] else {}),
        "original_sizes": torch.tensor([list(s["original_size"]) for s in samples], dtype=torch.long),
        "crop_top_left": torch.tensor([list(s["crop_top_left"]) for s in samples], dtype=torch.long),
    }
