"""End to end: launch/train_ldm.py trains, resumes bitwise, keeps stages 1-2 frozen, exports a pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from tiny import run, sha256, two_process_command

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def stages(captioned_images, tiny_autoencoder):
    return captioned_images, tiny_autoencoder


def tiny_args(stages, out, *extra):
    images, vae = stages
    return ["--preset", "tiny", "--data.source", str(images), "--val-data", str(images), "--vae", str(vae),
            "--text-encoder", "minilm", "--run.output-dir", str(out), *extra]


def train_steps(path):
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def test_resume_equals_straight_run_and_stages_stay_frozen(stages, tmp_path):
    from launch.train_ldm import main
    from ldm.pipeline import LatentDiffusionPipeline

    vae_before = sha256(stages[1] / "diffusion_pytorch_model.safetensors")
    main(tiny_args(stages, tmp_path / "straight"))
    main(tiny_args(stages, tmp_path / "split", "--run.max-steps", "4"))
    main(tiny_args(stages, tmp_path / "split"))
    assert train_steps(tmp_path / "split" / "metrics.jsonl").count(4) == 1, "the rerun must resume at step 4"
    assert sha256(tmp_path / "straight" / "pipeline" / UNET_WEIGHTS) == sha256(tmp_path / "split" / "pipeline" / UNET_WEIGHTS)

    # Frozen stages: the autoencoder file is untouched and the pipeline carries it byte for byte;
    # the exported text encoder equals the packaged MiniLM.
    pipe_dir = tmp_path / "straight" / "pipeline"
    assert sha256(stages[1] / "diffusion_pytorch_model.safetensors") == vae_before
    assert sha256(pipe_dir / "vae" / "diffusion_pytorch_model.safetensors") == vae_before
    from text_encoder import load_text_encoder

    from text_encoder import resolve_dtype

    # train_ldm encodes in dtype=auto (bf16 on AMX CPUs) and exports the values it computed with,
    # held exactly in float32: the packaged weights, rounded to that dtype.
    trained_in = resolve_dtype("auto", "cpu")
    fresh = load_text_encoder("minilm", dtype="fp32")
    pipe = LatentDiffusionPipeline.from_pretrained(pipe_dir)
    exported = pipe.text_encoder.model.state_dict()
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(exported[name], value.to(trained_in).float()), name
    if trained_in == torch.float32:
        probe = ["a red disc", ""]
        assert torch.equal(fresh.encode(probe).hidden, pipe.text_encoder.encode(probe).hidden)

    images = pipe(["a red disc"], steps=2, guidance_scale=3.0, seed=0)
    assert images[0].size == (32, 32)
    manifest = json.loads((pipe_dir / "ldm_manifest.json").read_text())
    assert manifest["training"]["run"]["ema_decay"] > 0 and manifest["training"]["p_uncond"] == 0.1  # EMA weights
    for name in ("samples.png", "loss_curves.png", "val_curves.png"):
        assert (tmp_path / "straight" / name).is_file(), name


def test_channels_last_run_resumes_bitwise_and_exports_dense_weights(stages, tmp_path):
    """Checkpoints store dense tensors; the fused AdamW reads memory in order, so moments restored
    contiguous beside channels-last weights would silently step wrong values after a resume."""
    from launch.train_ldm import main
    from ldm.pipeline import LatentDiffusionPipeline

    main(tiny_args(stages, tmp_path / "straight", "--channels-last"))
    main(tiny_args(stages, tmp_path / "split", "--channels-last", "--run.max-steps", "4"))
    main(tiny_args(stages, tmp_path / "split", "--channels-last"))
    assert sha256(tmp_path / "straight" / "pipeline" / UNET_WEIGHTS) == sha256(tmp_path / "split" / "pipeline" / UNET_WEIGHTS)
    unet = LatentDiffusionPipeline.from_pretrained(tmp_path / "straight" / "pipeline").unet
    assert all(p.is_contiguous() for p in unet.parameters())


@pytest.mark.slow
def test_two_processes_cached_muon_sigkill_then_resume_is_bitwise_equal(stages, tmp_path):
    # Muon, as the small preset trains: its momentum and Newton-Schulz run on every rank from the
    # all-reduced gradients, so the ranks' weights must stay identical and a resume exact.
    args = lambda out, *x: two_process_command("launch/train_ldm.py", *tiny_args(
        stages, out, "--cache-latents", "--cache-text", "--run.max-steps", "8", "--run.checkpoint-every", "3",
        "--run.lr-schedule", "cosine", "--optimizer", "muon", *x))
    straight = run(args(tmp_path / "straight"))
    assert "weights identical on all 2 processes" in straight.stderr
    crashed = run(args(tmp_path / "crash", "--run.crash-after-step", "5"), check=False)
    assert crashed.returncode != 0
    run(args(tmp_path / "crash"))
    state = json.loads((tmp_path / "crash" / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert state["world_size"] == 2
    manifest = json.loads((tmp_path / "crash" / "cache" / "cache_manifest.json").read_text())
    assert manifest["built_by_processes"] == 2 and manifest["num_samples"] == 24
    assert sha256(tmp_path / "straight" / "pipeline" / UNET_WEIGHTS) == sha256(tmp_path / "crash" / "pipeline" / UNET_WEIGHTS)


def test_compiled_unet_exports_plain_weights(stages, tmp_path, monkeypatch):
    # torch.compile wraps the UNet in an OptimizedModule whose state_dict keys start with
    # "_orig_mod."; evaluation and export must see the plain module (a GPU run once crashed at
    # export). The eager backend builds the same wrapper without inductor's minutes of compiling.
    from launch.train_ldm import main

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    main(tiny_args(stages, tmp_path / "compiled", "--compile", "--run.max-steps", "2"))
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "compiled" / "pipeline" / UNET_WEIGHTS).keys()
    assert "conv_in.weight" in keys and not any("_orig_mod" in k for k in keys)
