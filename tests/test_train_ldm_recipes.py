"""End to end: train_ldm with a flow-matching objective, and with two --data sources mixed 3:1."""

from __future__ import annotations

import json

import pytest

from tiny import make_captioned_folder


def tiny_args(data: list[str], vae, out, *extra):
    return ["--preset", "tiny", *(a for spec in data for a in ("--data", spec)), "--vae", str(vae),
            "--text-encoder", "minilm?max_length=8", "--run.output-dir", str(out), "--sample-every", "1000", *extra]


def test_flow_matching_run_with_pooled_text_trains_validates_and_exports_a_flow_pipeline(captioned_images, tiny_autoencoder, tmp_path):
    from launch.train_ldm import main
    from ldm.pipeline import LatentDiffusionPipeline

    out = tmp_path / "flow"
    main(tiny_args([str(captioned_images)], tiny_autoencoder, out, "--val-data", str(captioned_images),
                   "--diffusion.schedule.prediction-type", "flow_prediction",
                   "--diffusion.timestep-sampling", "logit_normal", "--run.max-steps", "4", "--unet.pooled-text"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "val" and r["val_loss"] > 0 for r in records)
    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.schedule.prediction_type == "flow_prediction"
    assert pipe.unet.config.addition_embed_type == "text"  # --unet.pooled-text reached the exported UNet
    images = pipe(["a red disc"], steps=2, guidance_scale=2.0, seed=0, sampler="euler")
    assert images[0].size == (32, 32)
    with pytest.raises(ValueError, match="flow"):
        pipe(["a red disc"], steps=2, sampler="ddim")


def test_two_sources_weighted_3_to_1_are_logged_per_source(captioned_images, tiny_autoencoder, tmp_path):
    from launch.train_ldm import main

    other = make_captioned_folder(tmp_path / "other", n=8, seed=1)
    out = tmp_path / "mixed"
    main(tiny_args([f"{captioned_images}#weight=3", f"{other}#weight=1"], tiny_autoencoder, out,
                   "--run.max-steps", "8", "--run.log-every", "8"))
    config = json.loads((out / "config.json").read_text())
    assert len(config["data"]["sources"]) == 2, "--data given twice must mix both sources, not keep the last"
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line][-1]
    counts = {k: v for k, v in row.items() if k.startswith("samples[")}
    assert len(counts) == 2
    first = next(v for k, v in counts.items() if str(captioned_images) in k and "other" not in k)
    second = next(v for k, v in counts.items() if "other" in k)
    assert first == 3 * second and first + second == 8 * 4  # 8 steps of batch 4, shares exact
