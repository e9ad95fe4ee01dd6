"""End to end: SIGTERM to the whole process group (what SLURM and `kill -TERM -PGID` do) while
train_ldm reads with 2 DataLoader workers: the run saves a checkpoint, exits 143, and the same
command resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tiny import ROOT


def _command(images, vae, out, max_steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "train_ldm.py"), "--preset", "tiny", "--data", str(images),
            "--vae", str(vae), "--text-encoder", "minilm?max_length=8", "--run.output-dir", str(out),
            "--run.num-workers", "2", "--run.max-steps", str(max_steps), "--run.log-every", "1",
            "--run.checkpoint-every", "1000", "--sample-every", "1000"]


def _train_steps(out) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]


def test_sigterm_to_the_process_group_with_workers_saves_and_resumes(captioned_images, tiny_autoencoder, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(_command(captioned_images, tiny_autoencoder, out, 100_000), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(_train_steps(out)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and both DataLoader workers
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output[-4000:]
    assert "DataLoader worker" not in output and "rerun the same command to resume" in output, output[-4000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved, "the preemption checkpoint is missing"
    stopped_at = int(saved[-1].split("_")[1])
    assert stopped_at >= 3

    resumed = subprocess.run(_command(captioned_images, tiny_autoencoder, out, stopped_at + 2), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at step {stopped_at}" in resumed.stdout + resumed.stderr
    assert (out / "pipeline" / "ldm_manifest.json").is_file()
