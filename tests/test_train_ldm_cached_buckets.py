"""End to end: train_ldm on bucketed, mixed data (two sources, weights 3:1, list captions) from the
latent cache on 2 CPU processes: SIGKILLed between checkpoints and rerun, it ends bitwise equal to
the uninterrupted run; the log counts each source's samples."""

from __future__ import annotations

import json

import pytest

import _data_fixtures as fx
from tiny import run, sha256, two_process_command

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
BUCKETS = ("64x64", "128x64", "64x128")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("cached_buckets")
    fx.make_mixed_shape_folder(root / "a", {"portrait": 2, "landscape": 2, "panorama": 2, "square": 2, "tiny": 2})
    rows = []
    for path in sorted((root / "a").glob("*.txt")):
        caption = path.read_text(encoding="utf-8")
        rows.append({"file_name": f"{path.stem}.png", "text": [caption, f"another view of {path.stem}"]})
        path.unlink()
    (root / "a" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    fx.make_mixed_shape_folder(root / "b", {"landscape": 2, "portrait": 2, "square": 2})
    return root / "a", root / "b"


@pytest.mark.slow
def test_two_processes_bucketed_mixed_cached_sigkill_then_resume_is_bitwise_equal(sources, tiny_autoencoder,
                                                                                 tmp_path):
    a, b = sources
    args = lambda out, *x: two_process_command(
        "launch/train_ldm.py", "--preset", "tiny", "--data", f"{a}#weight=3", "--data", f"{b}#weight=1",
        "--data.buckets", *BUCKETS, "--data.flip", "--vae", str(tiny_autoencoder), "--text-encoder",
        "minilm", "--cache-latents", "--cache-text", "--run.output-dir", str(out), "--run.max-steps", "8",
        "--run.checkpoint-every", "3", "--run.log-every", "4", "--val-every", "100", "--sample-every", "100", *x)
    straight = run(args(tmp_path / "straight"), timeout=600)
    assert "weights identical on all 2 processes" in straight.stderr
    crashed = run(args(tmp_path / "crash", "--run.crash-after-step", "5"), check=False, timeout=600)
    assert crashed.returncode != 0
    run(args(tmp_path / "crash"), timeout=600)

    state = json.loads((tmp_path / "crash" / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert state["world_size"] == 2
    manifest = json.loads((tmp_path / "crash" / "cache" / "cache_manifest.json").read_text())
    assert manifest["built_by_processes"] == 2 and manifest["num_samples"] == 16
    assert {tuple(s["bucket"]) for s in manifest["streams"]} == {(64, 64), (128, 64), (64, 128)}
    assert {s["source"] for s in manifest["streams"]} == {0, 1}
    assert sha256(tmp_path / "straight" / "pipeline" / UNET_WEIGHTS) == sha256(tmp_path / "crash" / "pipeline" / UNET_WEIGHTS)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    counts = [r for r in rows if r["kind"] == "train" and any(k.startswith("samples[") for k in r)][-1]
    shares = {k: v for k, v in counts.items() if k.startswith("samples[")}
    assert len(shares) == 2 and all(v > 0 for v in shares.values()), shares
    assert shares[f"samples[{a}]"] > shares[f"samples[{b}]"]
