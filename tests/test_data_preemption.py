"""Preemption with DataLoader workers: SIGTERM/SIGUSR1 sent to the whole process group (as SLURM and
`kill -TERM -PGID` do) must not kill the workers, so the main process can save and exit itself."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

import _data_fixtures as fx
from tiny import run

# Runs in its own session (process group): reads batches with 2 workers, installs a flag-setting
# handler as the training scripts do, signals its whole group, and keeps reading.
SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import data

    caught = []
    buckets = ("sdxl",) if sys.argv[3] == "buckets" else ()
    cfg = data.DataConfig(source=sys.argv[1], resolution=64 if buckets else 16, buckets=buckets)
    kwargs = dict(batch_size=2, seed=7, num_workers=2)
    loader = data.build_loader(cfg, **kwargs)
    keys = [next(loader)["keys"]]
    # Installed after the workers started (as when a run sets up preemption after its loader), so
    # the workers cannot have inherited it.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: caught.append(signal.Signals(signum).name))
    keys += [next(loader)["keys"]]
    os.killpg(os.getpgid(0), getattr(signal, sys.argv[2]))
    keys += [next(loader)["keys"] for _ in range(8)]  # past the prefetched items: workers must be alive
    reference = data.build_loader(cfg, **kwargs)
    expected = [next(reference)["keys"] for _ in range(10)]
    print(json.dumps({"caught": caught, "same": keys == expected}))
""")


@pytest.mark.parametrize(("signal_name", "loader"), [("SIGTERM", "plain"), ("SIGUSR1", "plain"), ("SIGTERM", "buckets")])
def test_workers_ignore_a_process_group_signal_and_the_main_process_reads_on(tmp_path, signal_name, loader):
    fx.make_image_folder(tmp_path / "folder", 12)
    result = run([sys.executable, "-c", SCRIPT, str(tmp_path / "folder"), signal_name, loader], timeout=120,
                 start_new_session=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["caught"] == [signal_name], "the main process's own handler must see the signal"
    assert report["same"], "batches after the signal differ from an uninterrupted loader's"


def test_a_user_worker_init_fn_still_runs_in_every_worker(tmp_path):
    fx.make_image_folder(tmp_path / "folder", 6)
    from data import DataConfig, build_loader

    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    loader = build_loader(DataConfig(source=str(tmp_path / "folder"), resolution=16), batch_size=2, seed=0,
                          num_workers=2, worker_init_fn=_MarkWorker(marker_dir))
    next(loader)
    assert sorted(p.name for p in marker_dir.iterdir()) == ["0", "1"]


class _MarkWorker:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        import signal

        # Runs after ours: the preemption signals are already ignored here.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        (self.folder / str(worker_id)).write_text("ran")
