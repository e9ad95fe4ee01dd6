"""ldm-generate end to end on a tiny saved pipeline: files, metadata, reproducibility, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import flip_bits, tiny_pipeline

from ldm.generate import main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    manifest_id = tiny_pipeline(root).save_pretrained(root / "model")
    return root / "model", manifest_id


def _run(model_dir, out, *extra):
    main(["--model", str(model_dir), "--out", str(out), "--steps", "3", "--device", "cpu", *extra])
    return sorted(out.glob("0*.png"))


def _pixels(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def test_writes_pngs_with_metadata_and_a_grid(model, tmp_path):
    model_dir, manifest_id = model
    paths = _run(model_dir, tmp_path / "a", "--prompt", "red flag", "--prompt", "a face", "--num-images", "2",
                 "--negative-prompt", "dark", "--seed", "7", "--grid", "--sampler", "euler_a", "--guidance", "3")  # fmt: skip
    assert [p.name for p in paths] == ["00000-seed7.png", "00001-seed8.png", "00002-seed9.png", "00003-seed10.png"]
    meta = Image.open(paths[2]).text
    assert meta["prompt"] == "a face" and meta["negative_prompt"] == "dark" and meta["seed"] == "9"
    assert meta["sampler"] == "euler_a" and meta["steps"] == "3" and meta["guidance"] == "3.0"
    assert meta["model_manifest_id"] == manifest_id
    assert json.loads(meta["ldm_generate"])["seed"] == 9
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size == (2 * 16, 2 * 16)  # one row per prompt, one column per image
    assert json.loads((tmp_path / "a" / "generate_config.json").read_text())["seed"] == 7


def test_same_command_same_images_and_batching_does_not_matter(model, tmp_path):
    model_dir, _ = model
    (tmp_path / "prompts.txt").write_text("red flag\n\na face\n")
    args = ("--prompts-file", str(tmp_path / "prompts.txt"), "--num-images", "2", "--seed", "3")
    first = _pixels(_run(model_dir, tmp_path / "a", *args, "--batch-size", "4"))
    again = _pixels(_run(model_dir, tmp_path / "b", *args, "--batch-size", "4"))
    small_batches = _pixels(_run(model_dir, tmp_path / "c", *args, "--batch-size", "1"))
    assert first.shape == (4, 16, 16, 3)
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - small_batches.astype(int)).max() <= 1
    # image 2 ("a face", seed 3 + 2) regenerated alone from what its PNG records
    alone = _pixels(_run(model_dir, tmp_path / "d", "--prompt", "a face", "--seed", "5"))
    assert np.abs(first[2].astype(int) - alone[0].astype(int)).max() <= 1


def _error(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    return " ".join(err.replace("│", " ").split())  # tyro's boxed message, unwrapped


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--guidance", "nan", "--guidance must be a finite number"),
        ("--guidance", "inf", "--guidance must be a finite number"),
        ("--guidance-rescale", "nan", "--guidance-rescale must be in [0, 1]"),
        ("--guidance-rescale", "1.5", "--guidance-rescale must be in [0, 1]"),
        ("--num-images", "0", "--num-images must be at least 1, not 0"),
        ("--batch-size", "0", "--batch-size must be at least 1, not 0"),
        ("--steps", "-3", "--steps must be at least 1, not -3"),
        ("--height", "0", "--height must be a positive number of pixels"),
    ],
)
def test_bad_values_are_refused_at_parse_time(model, tmp_path, capsys, flag, value, message):
    model_dir, _ = model
    out = tmp_path / "o"
    err = _error(capsys, "--model", str(model_dir), "--prompt", "x", "--device", "cpu", "--out", str(out), flag, value)
    assert message in err
    assert not out.exists()  # refused before anything was written


def test_bad_values_in_a_config_file_are_refused_too(model, tmp_path, capsys):
    (tmp_path / "gen.json").write_text(json.dumps({"model": str(model[0]), "prompt": ["x"], "guidance": float("nan")}))
    assert "--guidance must be a finite number" in _error(capsys, "--config", str(tmp_path / "gen.json"))


def test_unwritable_out_is_refused_before_sampling(model, tmp_path, capsys):
    model_dir, _ = model
    (tmp_path / "file.png").write_bytes(b"x")
    base = ("--model", str(model_dir), "--prompt", "x", "--device", "cpu")
    assert "is an existing file, not a folder" in _error(capsys, *base, "--out", str(tmp_path / "file.png"))
    assert "is a file, so the folder cannot be created" in _error(capsys, *base, "--out", str(tmp_path / "file.png" / "a"))
    if os.geteuid() != 0:  # root writes anywhere: the permission check cannot fail there
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write in" in _error(capsys, *base, "--out", str(locked / "a"))


def test_the_python_api_refuses_nan_guidance(model):
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model[0])
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe(["x"], steps=2, guidance_scale=float("nan"))


def test_clear_errors(model, tmp_path, capsys):
    model_dir, _ = model
    base = ("--model", str(model_dir), "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert "choose one of: ddpm, ddim, euler, euler_a, heun, dpmpp_2m" in _error(capsys, *base, "--sampler", "plms")
    assert "multiples of the autoencoder's downsampling factor 2" in _error(capsys, *base, "--height", "17")
    assert "--model DIR is required" in _error(capsys, "--prompt", "x")
    assert "no prompts" in _error(capsys, "--model", str(model_dir))
    missing = ("--model", str(tmp_path / "none"), "--prompt", "x", "--device", "cpu")
    assert "does not exist" in _error(capsys, *missing)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(model_dir, incomplete)
    shutil.rmtree(incomplete / "unet")
    assert "incomplete (missing unet/config.json)" in _error(capsys, "--model", str(incomplete), "--prompt", "x")
    flipped = tmp_path / "flipped"
    shutil.copytree(model_dir, flipped)
    weights = flipped / "vae" / "diffusion_pytorch_model.safetensors"
    flip_bits(weights, -5, 1)
    assert "fingerprint mismatch" in _error(capsys, "--model", str(flipped), "--prompt", "x", "--device", "cpu")


@pytest.mark.slow
def test_console_script_with_a_config_file(model, tmp_path):
    """The installed command, configured from a JSON file, matches the in-process run."""
    model_dir, _ = model
    config = {"model": str(model_dir), "prompt": ["a face"], "steps": 3, "seed": 4, "device": "cpu"}
    (tmp_path / "gen.json").write_text(json.dumps(config))
    script = shutil.which("ldm-generate", path=str(Path(sys.executable).parent))
    assert script, "ldm-generate is not installed in this environment (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([script, "--config", str(tmp_path / "gen.json"), "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    in_process = _run(model_dir, tmp_path / "api", "--prompt", "a face", "--seed", "4")
    assert np.array_equal(_pixels(sorted((tmp_path / "cli").glob("0*.png"))), _pixels(in_process))


def test_a_flow_model_samples_with_flow_samplers_and_refuses_the_others(tmp_path, capsys):
    from ldm.objective import NoiseScheduleConfig

    schedule = NoiseScheduleConfig(prediction_type="flow_prediction", flow_shift=3.0)
    tiny_pipeline(tmp_path, schedule=schedule).save_pretrained(tmp_path / "flow")
    base = ("--model", str(tmp_path / "flow"), "--prompt", "x", "--device", "cpu")
    for sampler in ("ddim", "dpmpp_2m_karras"):  # all four refusals: test_ldm_samplers
        out = tmp_path / sampler
        err = _error(capsys, *base, "--out", str(out), "--sampler", sampler)
        assert "has no flow-matching form in diffusers; a flow_prediction model can use: euler, heun, dpmpp_2m, unipc" in err
        assert not out.exists()
    for sampler in ("euler", "dpmpp_2m"):  # every flow sampler vs stock diffusers: test_pipeline_stock
        assert len(_run(tmp_path / "flow", tmp_path / f"ok-{sampler}", "--prompt", "x", "--sampler", sampler)) == 1
