"""Two real CPU processes (accelerate launch, gloo): disjoint samples, equal full steps, exact resume,
even when one process's shard is shorter and full of broken samples."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import _data_fixtures as fx

REPO = Path(__file__).resolve().parent.parent
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_data_for_the_same_number_of_steps(tmp_path):
    # Shard 0: 12 good samples. Shard 1: 9 good and 8 broken ones: one rank has less data and more
    # bad samples, and must still run all STEPS (it starts its next epoch sooner).
    fx.write_tar(tmp_path / "shards" / "shard-000000.tar", fx.good_members(0, 12))
    broken = [(f"x{i:02d}.{ext}", data) for i in range(8) for ext, data in (("png", b"junk"), ("txt", b"c"))]
    fx.write_tar(tmp_path / "shards" / "shard-000001.tar", fx.good_members(100, 9) + broken)
    out = tmp_path / "result.json"
    accelerate = Path(sys.executable).parent / "accelerate"
    # --multi_gpu starts 2 processes; the script's Accelerator(cpu=True) makes them a gloo group.
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(REPO / "tests" / "_data_fixtures.py"),
               str(tmp_path / "shards"), str(out), str(STEPS)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] == STEPS
    first_pass = [{k for batch in r["keys"][:2] for k in batch} for r in ranks]  # 8 samples, within epoch 0
    assert not first_pass[0] & first_pass[1], "the two processes read the same samples"
    assert any(r["bad"] for r in ranks), "the broken shard should have been met"
