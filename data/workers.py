"""What both loaders (``CaptionedLoader``, ``PlannedLoader``) share: DataLoader workers that survive a
preemption signal, their shutdown at exit, and the bookkeeping every loader exposes.

Preemption: SLURM and `kill -TERM -PGID` signal the whole process group, workers included. torch's
workers die on SIGTERM (its own handler) and on SIGUSR1 (the default action), and the main process
then fails with "DataLoader worker is killed by signal" before it can save. So every worker ignores
both (`ignore_preemption_signals`, run before any user `worker_init_fn`), and the main process
blocks them while it forks workers, so none can arrive in the instant before a worker ignores them;
a signal that came in meanwhile reaches the main process's own handler once the workers exist.
Ignoring SIGTERM also removes torch's way of ending workers at interpreter exit (multiprocessing
terminates daemonic children with SIGTERM, then joins them), so loaders with live workers are
closed by an atexit hook first: the workers get torch's ordinary stop message and exit.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from data.bad_samples import BadSampleTally
from data.config import DataConfigError


def _identity(item: Any) -> Any:
    return item


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_preemption_signals() -> None:
    """In a worker: ignore SIGTERM/SIGUSR1 (the main process saves and ends the workers itself)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)


class WorkerInit:
    """The DataLoader's worker_init_fn: ignore preemption signals, then run the user's own one.
    A class, not a closure, so that it also pickles for spawn-started workers."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        ignore_preemption_signals()
        if self.then is not None:
            self.then(worker_id)


_LOADERS_WITH_WORKERS: weakref.WeakSet[LoaderBase] = weakref.WeakSet()
_atexit_registered = False


def _close_loaders_at_exit() -> None:
    for loader in list(_LOADERS_WITH_WORKERS):
        loader.close()


def _track_workers(loader: LoaderBase) -> None:
    """Registered after torch imported multiprocessing, so it runs before multiprocessing's own hook."""
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_close_loaders_at_exit)
        _atexit_registered = True
    _LOADERS_WITH_WORKERS.add(loader)


@contextlib.contextmanager
def preemption_signals_blocked(active: bool) -> Iterator[None]:
    """Hold SIGTERM/SIGUSR1 back in this thread while workers are forked (they inherit the mask and
    unblock once they ignore the signals); a held signal is delivered on exit."""
    if not active:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class LoaderBase:
    """Iteration start, worker shutdown and the counts both loaders expose. Subclasses set
    ``tally``, ``rank``, ``worker_init`` and ``_iterator = None``, and define ``_dataloader()``."""

    tally: BadSampleTally
    rank: int
    worker_init: WorkerInit
    _iterator: Iterator[Any] | None

    def __iter__(self) -> LoaderBase:
        return self

    def _start(self) -> None:
        """Start torch's iterator (and its workers, with preemption signals held back meanwhile)."""
        dataloader = self._dataloader()
        with preemption_signals_blocked(dataloader.num_workers > 0):
            self._iterator = iter(dataloader)
        if dataloader.num_workers > 0:
            _track_workers(self)

    def _dataloader(self) -> DataLoader:
        raise NotImplementedError

    def _torch_loader(self, stream: IterableDataset, workers: int, prefetch_factor: int) -> DataLoader:
        return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity,
                          prefetch_factor=prefetch_factor if workers else None,
                          worker_init_fn=self.worker_init if workers else None)

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        """Unusable samples this process skipped so far, by reason."""
        return dict(self.tally.counts)

    @property
    def samples_seen(self) -> int:
        return self.tally.seen

    def _own_state(self, state: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
        """This rank's entry when ``state`` is the list of every rank's dict."""
        if not isinstance(state, list):
            return state
        mine = [s for s in state if s.get("rank") == self.rank]
        if len(mine) != 1:
            raise DataConfigError(f"The saved data states hold no single entry for rank {self.rank}.")
        return mine[0]

    def close(self) -> None:
        """Stop the worker processes (a new iteration starts fresh ones at the current position).
        Dropping torch's iterator shuts its workers down and joins them."""
        self._iterator = None
        _LOADERS_WITH_WORKERS.discard(self)


def _workers_dividing(lanes: int, num_workers: int) -> int:
    """The largest worker count <= num_workers that divides the lane count (0 stays 0)."""
    if num_workers == 0:
        return 0
    return max(k for k in range(1, min(lanes, num_workers) + 1) if lanes % k == 0)


def _json_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_copy(v) for v in value]
    return value
