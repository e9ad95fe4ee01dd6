"""`CachedPlannedLoader`: training batches from a bucketed or mixed latent cache, drawn as the uncached
planned loader (data/planned.py) draws them, and `cached_loader`, which picks the loader for a cache.

The cache's rows are grouped into the sub-streams (source, bucket) that the build's planned loader
had, in its order (the manifest's `streams`); a map source's rows are listed in the order of the
source's indices. Then the planned loader's own code decides everything:

- `data.planned.batch_counts` and `Schedule`: which sub-stream every step reads, the same on every
  process, buckets in proportion to their size, each source's weight or repeat exact per schedule
  epoch, the order a function of (seed, epoch). Weights and repeats come from this run's
  `--data.sources`, so they may change without rebuilding the cache.
- `data.planned.stream_part`: which rows of sub-stream k process r reads in k's epoch e.
- `data.sample.sample_draws(seed, e, identity)`: each sample's flip and caption variant.

With clean data (no sample dropped as unusable) and one reading lane (`num_workers` 0 uncached) a
cached run therefore sees the samples, flips and captions of the uncached run, batch for batch, for
image folders and `datasets` sources (a test checks it). Shard sources cannot be read out of order
uncached, so there the cached order differs (with the same guarantees); their rows are sorted by
identity, so it does not depend on how many processes built the cache.

The position is the step and, per sub-stream, [epoch, offset]: tiny JSON, exact resume.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

import data
from data.mix import mixed_sources
from data.planned import Schedule, SubStream, batch_counts, bucket_histogram, stream_part
from data.sample import sample_draws
from ldm.cache.loader import CachedLatentLoader, balance_weights, cached_batch, chosen_variant, own_rank_state
from ldm.cache.reader import LatentCache

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class CachedPlannedLoader:
    """An endless, resumable stream of cached batches of one (source, bucket) each, for process `rank`.

    Batches as `CachedLatentLoader`'s; `source_sample_counts`, `bucket_histogram` and `counts` as the
    planned loader's.
    """

    def __init__(self, cache: LatentCache, data_cfg: data.DataConfig, *, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, with_text: bool | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"CachedPlannedLoader needs batch_size >= 1 and 0 <= rank < world_size; got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if cache.streams is None:
            raise ValueError(f"the cache at {cache.path} holds one square source: read it with CachedLatentLoader")
        self.cache, self.batch_size, self.seed, self.rank, self.world_size = cache, batch_size, seed, rank, world_size
        self.with_text = cache.has_text if with_text is None else with_text
        self.mix = mixed_sources(data_cfg)
        self.labels = [s.source for s in self.mix]
        if len(self.mix) <= max(s["source"] for s in cache.streams):
            raise ValueError(f"the cache at {cache.path} holds more sources than --data names ({self.labels})")
        self.streams = self._sub_streams(cache)
        weights = [s.weight for s in self.mix] if self.mix[0].weight is not None else None
        self.counts = batch_counts(self.streams, [s.repeat for s in self.mix], weights, batch_size, world_size)
        if not sum(self.counts):
            raise ValueError(f"--data {' + '.join(self.labels)!r}: no source has cached samples to draw "
                             "(all repeat=0 or empty).")
        self.schedule = Schedule(self.counts, seed)
        self.step = 0
        self.stream_positions: dict[int, list[int]] = {}  # k -> [epoch of k, offset in this rank's part]
        self.batches = 0
        self.source_samples = [0] * len(self.mix)
        self._parts: dict[int, tuple[int, np.ndarray]] = {}  # k -> (epoch, its part), the latest only

    @staticmethod
    def _sub_streams(cache: LatentCache) -> list[SubStream]:
        groups: dict[tuple[int, tuple[int, int] | None], list[int]] = {}
        for row, (source, bucket) in enumerate(zip(cache.sources, cache.buckets)):
            groups.setdefault((source, bucket), []).append(row)
        streams = []
        for entry in cache.streams or []:
            bucket = None if entry["bucket"] is None else (entry["bucket"][0], entry["bucket"][1])
            rows = groups.get((entry["source"], bucket), [])
            if entry["shards"]:
                rows.sort(key=lambda r: cache.identities[r])
            else:  # identities are "source/index" (data.planned.map_identity): the source's index order
                rows.sort(key=lambda r: int(cache.identities[r].rsplit("/", 1)[1]))
            streams.append(SubStream(entry["source"], bucket, len(rows), indices=np.array(rows, dtype=np.int64)))
        return streams

    def _part(self, k: int, epoch: int) -> np.ndarray:
        if k not in self._parts or self._parts[k][0] != epoch:
            self._parts[k] = (epoch, stream_part(self.streams[k].indices, self.seed, k, epoch,  # type: ignore[arg-type]
                                                 self.rank, self.world_size, 0, 1))
        return self._parts[k][1]

    def __iter__(self) -> CachedPlannedLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        k = self.schedule.stream_at(self.step)
        epoch, offset = self.stream_positions.get(k, [0, 0])
        rows, flipped, variants = [], [], []
        while len(rows) < self.batch_size:  # as data.planned.PlannedStream._reader walks a map sub-stream
            part = self._part(k, epoch)
            if offset >= len(part):
                epoch, offset = epoch + 1, 0
                continue
            row = int(part[offset])
            offset += 1
            rows.append(row)
            draws = sample_draws(self.seed, epoch, self.cache.identities[row])  # as data.stream.process_record
            flipped.append(self.cache.has_flip and draws.flip < 0.5)
            variants.append(chosen_variant(self.cache, row, self.seed, epoch, draws))
        self.stream_positions[k] = [epoch, offset]
        self.step += 1
        self.batches += 1
        self.source_samples[self.streams[k].source] += len(rows)
        return cached_batch(self.cache, rows, flipped, variants, with_text=self.with_text)

    # ----- what the run logs -----------------------------------------------------------------------

    @property
    def source_sample_counts(self) -> dict[str, int]:
        """Samples each source (by its spec) contributed to the batches returned on this rank."""
        return dict(zip(self.labels, self.source_samples))

    @property
    def bucket_histogram(self) -> dict[str, int]:
        """Cached samples per bucket (all sources)."""
        return bucket_histogram(self.streams)

    @property
    def epoch(self) -> int:
        return self.step // sum(self.counts)

    # ----- state -----------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "cached-planned", "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "num_samples": len(self.cache)}

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "step": self.step, "batches": self.batches, "counts": list(self.counts),
                "streams": {str(k): list(p) for k, p in self.stream_positions.items()},
                "source_samples": list(self.source_samples)}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Restore this rank's position; `state` is its own dict or the list of all ranks' dicts."""
        state = own_rank_state(state, self.rank)
        for name, value in self._identity().items():
            if state.get(name) != value:
                raise ValueError(
                    f"cannot resume the cached data position: it was saved with {name}={state.get(name)!r}, this "
                    f"run has {name}={value!r}. Resume with the same cache, --data sources and buckets, batch "
                    "size, seed and process count.")
        if state.get("counts") != self.counts:
            logger.warning("The source weights or repeats changed since this position was saved (the batch schedule "
                           "differs): the run resumes, but not with the batches the uninterrupted run would have seen.")
        self.step, self.batches = int(state["step"]), int(state["batches"])
        self.stream_positions = {int(k): [int(e), int(o)] for k, (e, o) in state["streams"].items()}
        self.source_samples = [int(n) for n in state["source_samples"]]


def cached_loader(cache: LatentCache, data_cfg: data.DataConfig, *, batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1, with_text: bool | None = None) -> CachedLatentLoader | CachedPlannedLoader:
    """The training stream of `cache`: a CachedPlannedLoader for a bucketed or mixed cache, else a
    CachedLatentLoader. `data_cfg` is this run's --data (its weights and repeats decide the mix;
    `balance_by` and `balance_power` weight the samples of a square, single-source cache)."""
    if data_cfg.balance_by is not None:
        if cache.streams is not None:
            raise data.DataConfigError("--data.balance-by works on one square source for now; with --data.buckets or "
                                       "--data.sources, balance with the sources' weights instead (data/mix.py).")
        weights = balance_weights(cache.balance_values, data_cfg.balance_power, data_cfg.balance_by, cache.keys)
        if rank == 0:
            sizes = sorted(Counter(cache.balance_values).values())
            logger.info("--data.balance-by %s (power %g): %d values of 1 to %d samples; an epoch draws %d samples "
                        "with replacement, the largest value %.1f%% of them (%.1f%% unbalanced)",
                        data_cfg.balance_by, data_cfg.balance_power, len(sizes), sizes[-1], len(cache),
                        100 * sizes[-1] ** (1 - data_cfg.balance_power) / float(weights.sum()),
                        100 * sizes[-1] / len(cache))
        return CachedLatentLoader(cache, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                                  with_text=with_text, weights=weights)
    if cache.streams is None:
        return CachedLatentLoader(cache, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                                  with_text=with_text)
    return CachedPlannedLoader(cache, data_cfg, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                               with_text=with_text)
