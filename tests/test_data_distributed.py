"""Two real CPU processes (accelerate launch, gloo): disjoint samples, equal full steps, exact resume,
even when one process's shard is shorter and full of broken samples.

Run as a script under `accelerate launch` this file is the per-process side (`two_process_check`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    run(two_process_command("tests/test_data_distributed.py", tmp_path / "shards", out, STEPS), timeout=240)

    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] == STEPS
    first_pass = [{k for batch in r["keys"][:2] for k in batch} for r in ranks]  # 8 samples, within epoch 0
    assert not first_pass[0] & first_pass[1], "the two processes read the same samples"
    assert any(r["bad"] for r in ranks), "the broken shard should have been met"


def test_two_processes_step_through_the_same_buckets_and_sources_and_resume_exactly(tmp_path):
    fx.make_mixed_shape_folder(tmp_path / "a", {"portrait": 8, "landscape": 8, "square": 8})
    fx.make_mixed_shape_folder(tmp_path / "b", {"landscape": 8, "panorama": 8})
    overrides = {"sources": [f"{tmp_path / 'a'}#weight=3", f"{tmp_path / 'b'}#weight=1"], "buckets": ["sdxl"],
                 "resolution": 128}
    out, options = tmp_path / "result.json", tmp_path / "overrides.json"
    options.write_text(json.dumps(overrides))  # a file: accelerate's own argument parsing trips on "" and "-"
    run(two_process_command("tests/test_data_distributed.py", "none", out, 10, options), timeout=240)
    ranks = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["steps"] == ranks[1]["steps"] == 10
    assert ranks[0]["shapes"] == ranks[1]["shapes"], "the processes held different buckets at one step"
    assert len({tuple(s) for s in ranks[0]["shapes"]}) > 1, "the test needs several buckets"
    assert ranks[0]["sources"] == ranks[1]["sources"] and sum(ranks[0]["sources"].values()) == 40


def two_process_check(spec: str, out: Path, steps: int, overrides: dict | None = None) -> None:
    """Each of 2 CPU processes reads `steps` batches, checks they are full, saves its state halfway,
    then checks a fresh loader restored from the gathered states sees the same second half.
    `overrides`: more DataConfig fields (buckets, sources; spec "none" for none); batch shapes and
    per-source sample counts are reported as well."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    import data

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    cfg = data.DataConfig(**{"source": "" if spec == "none" else spec, "resolution": 16, "max_bad_fraction": 0.5,
                             "bad_fraction_min_seen": 10_000,
                             **{k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}})
    kwargs = dict(batch_size=4, seed=3, rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = data.build_loader(cfg, **kwargs)
    keys, shapes, states = [], [], None
    for step in range(steps):
        if step == steps // 2:
            states = gather_object([loader.state_dict()])
        batch = next(loader)
        assert batch["pixel_values"].shape[0] == 4
        keys.append(batch["keys"])
        shapes.append(list(batch["pixel_values"].shape))
    resumed = data.build_loader(cfg, **kwargs)
    resumed.load_state_dict(states)
    second_half = [next(resumed)["keys"] for _ in range(steps - steps // 2)]
    assert second_half == keys[steps // 2:], "resumed loader diverged"
    counts = getattr(loader, "source_sample_counts", None)
    assert counts is None or counts == resumed.source_sample_counts, "per-source counts not restored"
    everything = gather_object([{"rank": accelerator.process_index, "keys": keys, "steps": len(keys),
                                 "bad": loader.bad_sample_counts, "shapes": shapes, "sources": counts}])
    if accelerator.is_main_process:
        out.write_text(json.dumps(everything), encoding="utf-8")
    # Leaving gloo's process group to interpreter shutdown sometimes aborts a rank ("terminate
    # called without an active exception", SIGABRT), which fails the launch after the work is done.
    accelerator.end_training()


if __name__ == "__main__":
    two_process_check(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]),
                      json.loads(Path(sys.argv[4]).read_text()) if len(sys.argv) > 4 else None)
