"""One training process group per run folder: a second launch into a folder that is being trained is refused.

Two launches into one folder (a job requeued while the old one still runs, a command started
twice) would write the same checkpoint names, rotate each other's checkpoints away and mix their
files. Rank 0 holds an exclusive ``flock`` on ``OUTPUT/.run.lock`` while it trains; the kernel
drops it when the process ends, however it ends (SIGKILL included), so a stale lock never blocks
a resume. ``flock`` is advisory and local to one machine's view of the filesystem; on network
filesystems without lock support the check passes silently.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".run.lock"
_HELD: dict[Path, int] = {}  # run folder -> open descriptor holding its lock (this process)


class RunFolderBusy(SystemExit):
    """Another process is training in this run folder (a ``SystemExit``: exit 1 with the message)."""


def acquire(run_dir: str | Path) -> None:
    """Lock ``run_dir`` for this process (idempotent); raise ``RunFolderBusy`` naming the holder."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderBusy(
            f"{run_dir} is being trained by another process ({holder}); wait for it to finish or stop it "
            "(SIGTERM saves a checkpoint), then rerun. Two runs in one folder would overwrite each other's checkpoints."
        ) from None
    except OSError:  # no lock support on this filesystem: nothing to check with
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    _HELD[run_dir] = fd


def release(run_dir: str | Path) -> None:
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock
