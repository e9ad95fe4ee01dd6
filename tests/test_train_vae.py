"""End to end: launch/train_vae.py trains, resumes bitwise, exports a stock AutoencoderKL folder."""

from __future__ import annotations

import json

import pytest

from tiny import run, sha256, two_process_command

WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_args(data, out, *extra):
    return ["--preset", "tiny", "--data.source", str(data), "--val-data", str(data),
            "--run.output-dir", str(out), *extra]


def test_single_process_resume_equals_straight_run_and_exports(captioned_images, tmp_path):
    from diffusers import AutoencoderKL

    from launch.train_vae import main

    main(tiny_args(captioned_images, tmp_path / "straight"))
    main(tiny_args(captioned_images, tmp_path / "split", "--run.max-steps", "4"))
    main(tiny_args(captioned_images, tmp_path / "split"))  # same command, larger budget: resumes at 4

    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == sorted(steps) and steps.count(4) == 1, "the second run must start after step 4, not at 0"
    assert sha256(tmp_path / "straight" / "model" / WEIGHTS) == sha256(tmp_path / "split" / "model" / WEIGHTS)

    model_dir = tmp_path / "straight" / "model"
    contract = json.loads((model_dir / "latent_contract.json").read_text())
    assert len(contract["latent_mean"]) == 4
    vae = AutoencoderKL.from_pretrained(model_dir)
    assert vae.config.scaling_factor == 1.0
    for name in ("reconstructions.png", "loss_curves.png", "config.json"):
        assert (tmp_path / "straight" / name).is_file(), name
    val = [r for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "val"]
    assert val and all("psnr" in r and "ssim" in r for r in val)

    # A finished run does nothing when relaunched.
    before = (tmp_path / "straight" / "metrics.jsonl").read_text()
    main(tiny_args(captioned_images, tmp_path / "straight"))
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_two_processes_sigkill_between_checkpoints_then_resume_is_bitwise_equal(captioned_images, tmp_path):
    args = lambda out, *x: two_process_command("launch/train_vae.py", *tiny_args(
        captioned_images, out, "--run.max-steps", "8", "--run.checkpoint-every", "3", "--run.lr-schedule", "cosine",
        *x))
    run(args(tmp_path / "straight"))
    crashed = run(args(tmp_path / "crash", "--run.crash-after-step", "5"), check=False)
    assert crashed.returncode != 0, "SIGKILL of rank 0 must make the launcher fail"
    assert not (tmp_path / "crash" / "model").exists()
    run(args(tmp_path / "crash"))

    state = json.loads((tmp_path / "crash" / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert state["world_size"] == 2, "must really run two processes (accelerate --cpu + --multi_gpu)"
    assert sha256(tmp_path / "straight" / "model" / WEIGHTS) == sha256(tmp_path / "crash" / "model" / WEIGHTS)


def test_time_budget_ends_the_run_with_an_export_and_a_rerun_does_nothing(captioned_images, tmp_path):
    from launch.train_vae import main

    args = tiny_args(captioned_images, tmp_path / "budget", "--run.max-steps", "1000",
                     "--run.max-train-minutes", "0.0001")
    main(args)
    done = json.loads((tmp_path / "budget" / "model" / "finished.json").read_text())
    assert 1 <= done["step"] < 1000
    before = (tmp_path / "budget" / "metrics.jsonl").read_text()
    main(args)
    assert (tmp_path / "budget" / "metrics.jsonl").read_text() == before


def test_a_validation_the_last_step_would_repeat_is_skipped(captioned_images, tmp_path):
    from launch.train_vae import main

    main(tiny_args(captioned_images, tmp_path / "run", "--run.max-steps", "9"))  # val_every 4: 4, (8), 9
    rows = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in rows if r["kind"] == "val"] == [4, 9]
