"""Two real CPU processes (accelerate launch, gloo): disjoint samples, equal full steps, exact resume,
even when one process's shard is shorter and full of broken samples."""

from __future__ import annotations

import json

import _data_fixtures as fx
from tiny import run, two_process_command

STEPS = 6


def test_two_processes_read_disjoint_data_for_the_same_number_of_steps(tmp_path):
    # Shard 0: 12 good samples. Shard 1: 9 good and 8 broken ones: one rank has less data and more
    # bad samples, and must still run all STEPS (it starts its next epoch sooner).
    fx.write_tar(tmp_path / "shards" / "shard-000000.tar", fx.good_members(0, 12))
    broken = [(f"x{i:02d}.{ext}", data) for i in range(8) for ext, data in (("png", b"junk"), ("txt", b"c"))]
    fx.write_tar(tmp_path / "shards" / "shard-000001.tar", fx.good_members(100, 9) + broken)
    out = tmp_path / "result.json"
    # The script's Accelerator(cpu=True) makes the 2 processes a gloo group.
    run(two_process_command("tests/_data_fixtures.py", tmp_path / "shards", out, STEPS), timeout=240)

    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] == STEPS
    first_pass = [{k for batch in r["keys"][:2] for k in batch} for r in ranks]  # 8 samples, within epoch 0
    assert not first_pass[0] & first_pass[1], "the two processes read the same samples"
    assert any(r["bad"] for r in ranks), "the broken shard should have been met"
