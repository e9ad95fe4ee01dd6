"""`build_loader` (endless, resumable training batches) and `iterate_once` (one deterministic pass).

We shard by rank ourselves instead of letting accelerate.prepare() wrap the DataLoader, so that the
position is ours to save: `state_dict()` is small JSON, one per rank. A checkpoint must keep every
rank's state (gather them, e.g. with accelerate.utils.gather_object); `load_state_dict` accepts that
list and picks its own rank's entry.

Batches are always full: a bad sample is counted and the next one drawn. Because the stream is
endless, every rank runs exactly as many steps as the training loop asks for, however uneven the
shards or the bad samples are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from data.bad_samples import BadSampleTally
from data.config import DataConfig, DataConfigError
from data.hf_datasets import HFDatasetSource
from data.imagefolder import ImageFolderSource
from data.spec import SourceSpec, parse_source_spec
from data.stream import IndexStream, MapSource, ShardPlan, ShardStream, collate
from data.workers import LoaderBase, WorkerInit, _json_copy, _workers_dividing

logger = logging.getLogger("data")

STATE_VERSION = 1
# Consecutive end-of-unit markers without a single sample after which shards are declared empty.
EMPTY_UNITS_LIMIT = 10_000


def open_map_source(spec: SourceSpec, cfg: DataConfig) -> MapSource:
    """Image folders and `datasets` datasets: random access by index."""
    if spec.kind == "imagefolder":
        return ImageFolderSource(spec.locations[0], cfg)
    return HFDatasetSource(spec, cfg)


class CaptionedLoader(LoaderBase):
    """An iterator of collated batches for one rank, with an exact, JSON-ready resume position.

    Batches: {"pixel_values": float32 [B, 3, H, W] in [-1, 1], "captions": list[str],
    "keys": list[str], "original_sizes": long [B, 2] (H, W before resizing)}.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, endless: bool, worker_init_fn: Callable[[int], None] | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise DataConfigError(
                f"Loader needs batch_size >= 1, 0 <= rank < world_size and num_workers >= 0; got "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}, num_workers={num_workers}."
            )
        if cfg.buckets or cfg.sources:
            raise DataConfigError("Bucketed or mixed data needs build_loader/iterate_once (a PlannedLoader).")
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.rank, self.world_size, self.num_workers, self.endless = rank, world_size, num_workers, endless
        self.worker_init = WorkerInit(worker_init_fn)
        self.spec = parse_source_spec(cfg.source, allow_pipe_urls=cfg.allow_pipe_urls)
        self.tally = BadSampleTally(cfg.source, cfg.max_bad_fraction, cfg.bad_fraction_min_seen, rank)
        self.batches = 0
        self._iterator: Any = None
        self._empty_run = 0
        if self.spec.kind == "webdataset":
            self.source: MapSource | None = None
            lanes = max(1, num_workers)
            self.plan = ShardPlan.make(self.spec.locations, world_size, lanes)
            self.position: Any = {"lanes": [[0, 0, 0, 0] for _ in range(lanes)], "next_lane": 0}
        else:
            self.source = open_map_source(self.spec, cfg)
            if len(self.source) < world_size:
                raise DataConfigError(
                    f"--data {cfg.source!r} has {len(self.source)} samples, fewer than the {world_size} processes."
                )
            self.position = 0

    # ----- iteration -------------------------------------------------------------------------------

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start()
        samples: list[dict[str, Any]] = []
        while len(samples) < self.batch_size:
            item = next(self._iterator, None)
            if item is None:  # only a finite pass ends; its last batch may be short
                if samples:
                    break
                raise StopIteration
            self._advance(item)
            if "sample" in item:
                self.tally.good()
                samples.append(item["sample"])
                self._empty_run = 0
            elif "bad" in item:
                self.tally.bad(*item["bad"], key=item["key"], origin=item["origin"])
                self._empty_run = 0
            else:
                self._count_empty_unit()
        self.batches += 1
        return collate(samples)

    def _advance(self, item: dict[str, Any]) -> None:
        if self.source is not None:
            self.position = item["position"]
        else:
            lanes = self.position["lanes"]
            lanes[item["lane"]] = item["position"]
            self.position["next_lane"] = (item["lane"] + 1) % len(lanes)

    def _count_empty_unit(self) -> None:
        self._empty_run += 1
        if self._empty_run > EMPTY_UNITS_LIMIT:
            raise DataConfigError(f"--data {self.cfg.source!r}: the shards hold no readable samples.")

    def _dataloader(self) -> DataLoader:
        if self.source is not None:
            stream: Any = IndexStream(self.source, self.cfg, self.seed, self.rank, self.world_size,
                                      start=self.position, endless=self.endless)
            workers = self.num_workers
        else:
            lanes = self.position["lanes"]
            stream = ShardStream(self.plan, self.cfg, self.seed, self.rank, self.world_size,
                                 positions=[list(p) for p in lanes], next_lane=self.position["next_lane"],
                                 endless=self.endless)
            workers = _workers_dividing(len(lanes), self.num_workers)
        return self._torch_loader(stream, workers, prefetch_factor=4)

    # ----- state -----------------------------------------------------------------------------------

    @property
    def source_sample_counts(self) -> dict[str, int]:
        """Samples the source contributed to the batches returned on this rank (as PlannedLoader's)."""
        return {self.cfg.source: self.tally.seen - self.tally.total_bad}

    @property
    def epoch(self) -> int:
        """The epoch being read (for shards: the oldest epoch any lane is still in)."""
        if self.source is not None:
            return self.position // (len(self.source) // self.world_size) if self.endless else 0
        return min(lane[0] for lane in self.position["lanes"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "source": self.cfg.source, "seed": self.seed, "rank": self.rank,
            "world_size": self.world_size, "endless": self.endless, "batches": self.batches,
            "position": _json_copy(self.position), "bad_samples": self.tally.state_dict(),
            "source_size": self._source_size(),
        }

    def _source_size(self) -> int:
        """Samples of a map source, or shards: a resumed run warns if the data changed under it."""
        return len(self.source) if self.source is not None else len(self.plan.shards)

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Restore this rank's position; `state` is its own dict or the list of all ranks' dicts."""
        state = self._own_state(state)
        self._check_state(state)
        if state.get("source_size") != self._source_size():
            logger.warning(
                "The data changed since this position was saved (%s then, %s now samples or shards): the "
                "run resumes, but not with exactly the batches the uninterrupted run would have seen.",
                state.get("source_size"), self._source_size(),
            )
        self.close()
        self.position = _json_copy(state["position"])
        self.batches = int(state["batches"])
        self.tally.load_state_dict(state["bad_samples"])
        if self.source is None:
            lanes = len(self.position["lanes"])
            self.plan = ShardPlan.make(self.spec.locations, self.world_size, lanes)
            if _workers_dividing(lanes, self.num_workers) != self.num_workers:
                logger.warning(
                    "Resuming shards read by %d lanes with num_workers=%d: using %d workers so that the "
                    "sample order stays exactly the same.", lanes, self.num_workers,
                    _workers_dividing(lanes, self.num_workers),
                )

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(f"Saved data state has version {state.get('version')}, expected {STATE_VERSION}.")
        if state.get("kind", "plain") != "plain":
            raise DataConfigError("The saved data position is of a bucketed or mixed run; resume it with the same "
                                  "--data.buckets and --data.sources.")
        current = {"source": self.cfg.source, "seed": self.seed, "world_size": self.world_size,
                   "rank": self.rank, "endless": self.endless}
        for name, value in current.items():
            if state.get(name) != value:
                raise DataConfigError(
                    f"Cannot resume the data position: it was saved with {name}={state.get(name)!r}, this run "
                    f"has {name}={value!r}. Resume with the same --data source, seed and number of processes."
                )



def _loader_class(cfg: DataConfig) -> Any:
    """Bucketed or mixed data: the scheduled loader (data/planned_loader.py); else the plain one."""
    if cfg.buckets or cfg.sources:
        from data.planned_loader import PlannedLoader

        return PlannedLoader
    return CaptionedLoader


def build_loader(cfg: DataConfig, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, worker_init_fn: Callable[[int], None] | None = None) -> CaptionedLoader:
    """An endless, resumable stream of training batches for process `rank` of `world_size`.
    `worker_init_fn` runs in each worker after it has set SIGTERM/SIGUSR1 to be ignored.
    With `cfg.buckets` or `cfg.sources` a PlannedLoader (same interface) is returned."""
    if cfg.balance_by is not None:
        raise DataConfigError(f"--data.balance-by {cfg.balance_by} draws samples by weight from the latent cache: "
                              "train with --cache-latents (train_ldm), or leave --data.balance-by unset.")
    return _loader_class(cfg)(cfg, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                              num_workers=num_workers, endless=True, worker_init_fn=worker_init_fn)


def iterate_once(cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, worker_init_fn: Callable[[int], None] | None = None) -> CaptionedLoader:
    """One finite pass over this rank's share (centre crop, no flip, stored order), e.g. for latent
    statistics or validation. Ranks' shares may differ by a few samples, and the last batch may be
    short: reduce across ranks after the pass, not per batch."""
    return _loader_class(cfg)(cfg, batch_size=batch_size, seed=0, rank=rank, world_size=world_size,
                              num_workers=num_workers, endless=False, worker_init_fn=worker_init_fn)
