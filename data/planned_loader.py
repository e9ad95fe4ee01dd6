"""The loader for bucketed and mixed data (data/planned.py): same interface as CaptionedLoader.

`build_loader`/`iterate_once` return one when `--data.buckets` or `--data.sources` is set. Extra
batch key: none; extra properties: `source_sample_counts` (samples each source contributed to the
batches returned so far, saved and restored with the state), `bucket_histogram` (samples per bucket).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from data.bad_samples import BadSampleTally
from data.buckets import bucket_name, bucket_of_shard, nearest_bucket, resolve_buckets
from data.config import DataConfig, DataConfigError
from data.loader import open_map_source
from data.workers import LoaderBase, WorkerInit, _json_copy, _workers_dividing
from data.mix import mixed_sources
from data.planned import PlannedStream, SubStream, batch_counts, bucket_histogram
from data.size_index import image_sizes, shard_sample_counts
from data.spec import parse_source_spec
from data.stream import MapSource

logger = logging.getLogger("data")

STATE_VERSION = 1


class PlannedLoader(LoaderBase):
    """Batches of one (source, bucket) each, in the schedule's order, for one rank; exact resume."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, endless: bool, worker_init_fn: Callable[[int], None] | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise DataConfigError(
                f"Loader needs batch_size >= 1, 0 <= rank < world_size and num_workers >= 0; got "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}, num_workers={num_workers}.")
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.rank, self.world_size, self.num_workers, self.endless = rank, world_size, num_workers, endless
        self.worker_init = WorkerInit(worker_init_fn)
        self.mix = mixed_sources(cfg)
        self.cfgs = [s.data_config(cfg) for s in self.mix]
        self.buckets = resolve_buckets(cfg.buckets, cfg.resolution) if cfg.buckets else []
        self.label = " + ".join(c.source for c in self.cfgs)
        self.tally = BadSampleTally(self.label, cfg.max_bad_fraction, cfg.bad_fraction_min_seen, rank)
        self.sources: list[MapSource | None] = []
        self.streams: list[SubStream] = []
        for i, source_cfg in enumerate(self.cfgs):
            self._add_source(i, source_cfg)
        for i, source_cfg in enumerate(self.cfgs):
            # A lane holds one shuffle block per shard sub-stream it reads: split the block over a
            # source's buckets so memory stays about one block per lane (e.g. 41 SDXL buckets).
            n = sum(1 for s in self.streams if s.source == i and s.shards is not None)
            if n > 1:
                self.cfgs[i] = source_cfg.replace(shuffle_block=max(8, math.ceil(source_cfg.shuffle_block / n)))
        weights = [s.weight for s in self.mix] if self.mix[0].weight is not None else None
        self.counts = batch_counts(self.streams, [s.repeat for s in self.mix], weights, batch_size, world_size)
        if endless and not sum(self.counts):
            raise DataConfigError(f"--data {self.label!r}: no source has samples to draw (all repeat=0 or empty).")
        self.lanes = max(1, num_workers)
        first = (lambda j: {"step": j, "streams": {}}) if endless else (lambda j: {"stream": 0, "at": [0, 0, 0, 0]})
        self.position: dict[str, Any] = {"lanes": [first(j) for j in range(self.lanes)], "next_lane": 0}
        self.source = None  # no single map source (CaptionedLoader's attribute, for callers that size a pass)
        self.batches = 0
        self.source_samples = [0] * len(self.mix)
        self.last_stream: SubStream | None = None
        """The sub-stream (source, bucket) of the batch returned last (the latent cache groups by it)."""
        self._iterator: Any = None

    def _add_source(self, i: int, cfg: DataConfig) -> None:
        spec = parse_source_spec(cfg.source, allow_pipe_urls=cfg.allow_pipe_urls)
        if spec.kind == "webdataset":
            self.sources.append(None)
            sizes = shard_sample_counts(spec.locations)
            groups: dict[Any, list[int]] = {}
            for n, location in enumerate(spec.locations):
                groups.setdefault(self._shard_bucket(location, cfg) if self.buckets else None, []).append(n)
            for bucket, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
                self.streams.append(SubStream(i, bucket, sum(sizes[n] for n in members),
                                              shards=tuple(spec.locations[n] for n in members)))
            return
        source = open_map_source(spec, cfg)
        self.sources.append(source)
        if not self.buckets:
            self.streams.append(SubStream(i, None, len(source), indices=np.arange(len(source))))
            return
        assigned = np.array([nearest_bucket(self.buckets, *size) if size else nearest_bucket(self.buckets, 1, 1)
                             for size in image_sizes(source, cfg)], dtype=np.int64)
        for b, bucket in enumerate(self.buckets):
            indices = np.flatnonzero(assigned == b)
            if len(indices):
                self.streams.append(SubStream(i, bucket, len(indices), indices=indices))

    def _shard_bucket(self, location: str, cfg: DataConfig) -> tuple[int, int]:
        bucket = bucket_of_shard(location.rsplit("/", 1)[-1])
        if bucket is None:
            raise DataConfigError(
                f"--data {cfg.source!r}: shard {location!r} holds no single bucket, and shards cannot be read out "
                "of order to sort them. Write bucketed shards once: python -m launch.prepare_data --data SPEC "
                f"--out OUT --data.buckets {' '.join(self.cfg.buckets)} --data.resolution {self.cfg.resolution}.")
        if bucket not in self.buckets:
            raise DataConfigError(
                f"Shard {location!r} holds bucket {bucket_name(bucket)}, which is not among --data.buckets "
                f"{[bucket_name(b) for b in self.buckets]}; use the buckets (and resolution) the shards were prepared with.")
        return bucket

    # ----- iteration -------------------------------------------------------------------------------

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start()
        while True:
            item = next(self._iterator, None)
            if item is None:
                raise StopIteration
            if "error" in item:
                raise DataConfigError(item["error"])
            self.position["lanes"][item["lane"]] = item["position"]
            self.position["next_lane"] = (item["lane"] + 1) % self.lanes
            for reason, message, key, origin in item["bad"]:
                self.tally.bad(reason, message, key=key, origin=origin)
            if item["batch"] is None:  # a finite pass's chunk of bad records only
                continue
            n = len(item["batch"]["keys"])
            for _ in range(n):
                self.tally.good()
            self.source_samples[self.streams[item["stream"]].source] += n
            self.last_stream = self.streams[item["stream"]]
            self.batches += 1
            return item["batch"]

    def _dataloader(self) -> DataLoader:
        lanes = self.position["lanes"]
        stream = PlannedStream(self.streams, self.sources, self.cfgs, self.counts, self.batch_size, self.seed,
                               self.rank, self.world_size, positions=_json_copy(lanes),
                               next_lane=self.position["next_lane"], endless=self.endless)
        workers = _workers_dividing(len(lanes), self.num_workers)
        return self._torch_loader(stream, workers, prefetch_factor=2)

    # ----- state -----------------------------------------------------------------------------------

    @property
    def source_sample_counts(self) -> dict[str, int]:
        """Samples each source (by its spec) contributed to the batches returned on this rank."""
        return {c.source: n for c, n in zip(self.cfgs, self.source_samples)}

    @property
    def bucket_histogram(self) -> dict[str, int]:
        """Samples per bucket (all sources), as assigned when the loader was built."""
        return bucket_histogram(self.streams)

    @property
    def epoch(self) -> int:
        """The schedule epoch of the oldest lane (0 in a finite pass)."""
        if not self.endless:
            return 0
        return min(lane["step"] for lane in self.position["lanes"]) // max(1, sum(self.counts))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "kind": "planned", "source": self.label, "buckets": list(self.cfg.buckets),
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "endless": self.endless,
            "batch_size": self.batch_size, "batches": self.batches, "position": _json_copy(self.position),
            "bad_samples": self.tally.state_dict(), "source_samples": list(self.source_samples),
            "counts": list(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Restore this rank's position; `state` is its own dict or the list of all ranks' dicts."""
        state = self._own_state(state)
        current = {"version": STATE_VERSION, "kind": "planned", "source": self.label, "buckets": list(self.cfg.buckets),
                   "seed": self.seed, "world_size": self.world_size, "rank": self.rank, "endless": self.endless,
                   "batch_size": self.batch_size}
        for name, value in current.items():
            if state.get(name) != value:
                raise DataConfigError(
                    f"Cannot resume the data position: it was saved with {name}={state.get(name)!r}, this run "
                    f"has {name}={value!r}. Resume with the same --data sources, buckets, batch size, seed and "
                    "number of processes.")
        if state.get("counts") != self.counts:
            logger.warning("The data changed since this position was saved (the batch schedule differs): the run "
                           "resumes, but not with exactly the batches the uninterrupted run would have seen.")
        self.close()
        self.position = _json_copy(state["position"])
        self.lanes = len(self.position["lanes"])
        self.batches = int(state["batches"])
        self.source_samples = [int(n) for n in state["source_samples"]]
        self.tally.load_state_dict(state["bad_samples"])
