"""ldm.pipeline: save/load round trip, the folder layout and manifest, and clear refusals."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from tiny import flip_bits, tiny_pipeline

from ldm.manifest import MANIFEST_NAME, PipelineFolderError, PipelineMismatchError
from ldm.pipeline import LatentDiffusionPipeline
from ldm.unet import build_unet

PROMPTS = ["red flag", "a face"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    pipe = tiny_pipeline(root)
    manifest_id = pipe.save_pretrained(root / "saved")
    return pipe, root, manifest_id


def _pixels(images):
    return np.stack([np.asarray(i) for i in images])


def test_folder_layout_and_manifest(built):
    pipe, root, manifest_id = built
    folder = root / "saved"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["manifest_id"] == manifest_id and len(manifest_id) == 64
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["files"]
    assert "vae/latent_contract.json" in manifest["files"]  # the autoencoder folder is copied whole
    assert manifest["autoencoder"]["latent_contract"]["latent_std"] == [1.0] * 4
    assert manifest["autoencoder"]["factor"] == 2 and manifest["autoencoder"]["scaling_factor"] == 1.0
    assert manifest["text_encoder"]["null_embedding"] == "empty"
    assert manifest["text_encoder"]["fingerprint"]["hidden_size"] == 32
    assert manifest["schedule"]["prediction_type"] == "epsilon"
    assert manifest["unet"]["config"]["block_out_channels"] == [16, 32]
    assert manifest["training"]["p_uncond"] == 0.1
    assert not any(f.suffix in (".bin", ".pt", ".ckpt", ".pkl") for f in folder.rglob("*"))
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_saved_then_loaded_gives_the_same_images(built):
    pipe, root, manifest_id = built
    loaded = LatentDiffusionPipeline.from_pretrained(root / "saved")
    assert loaded.manifest_id == pipe.manifest_id == manifest_id and loaded.default_sampler == pipe.default_sampler
    kw = dict(num_images_per_prompt=2, steps=4, guidance_scale=5.0, seed=3)
    assert np.array_equal(_pixels(pipe(PROMPTS, **kw)), _pixels(loaded(PROMPTS, **kw)))


def test_images_do_not_depend_on_batching(built):
    pipe = built[0]
    together = pipe.generate(PROMPTS, num_images_per_prompt=2, steps=3, seed=10, batch_size=4)
    assert [g.seed for g in together] == [10, 11, 12, 13]
    assert [g.prompt for g in together] == ["red flag", "red flag", "a face", "a face"]
    one_by_one = pipe.generate(PROMPTS, num_images_per_prompt=2, steps=3, seed=10, batch_size=1)
    alone = pipe.generate(["a face"], steps=3, seed=13)  # regenerate image 3 from its seed
    a, b = _pixels([g.image for g in together]), _pixels([g.image for g in one_by_one])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(a[3].astype(int) - _pixels([alone[0].image])[0].astype(int)).max() <= 1
    assert not np.array_equal(a[2], a[3])  # different seeds, different images


def test_saving_an_ema_copy_leaves_the_live_unet_alone(built, tmp_path):
    from launch.training.ema import EMA, averaged_copy

    pipe = built[0]
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    ema = EMA(pipe.unet, decay=0.9)
    for shadow in ema.weights().values():
        shadow.fill_(0.01)
    ema_pipe = LatentDiffusionPipeline(averaged_copy(pipe.unet, ema), pipe.vae, pipe.text_encoder, pipe.schedule,
                                       vae_dir=pipe.vae_dir, unet_config=pipe.unet_config)
    ema_pipe.save_pretrained(tmp_path / "ema")
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "ema")
    assert all(torch.all(p == 0.01) for p in loaded.unet.parameters())
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    assert averaged_copy(pipe.unet, None) is not pipe.unet  # without EMA: a copy of the live weights


def test_existing_folder_needs_overwrite_and_failed_save_leaves_nothing(built, tmp_path, monkeypatch):
    pipe, root, _ = built
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipe.save_pretrained(root / "saved")

    def broken_export(out_dir):
        raise OSError("disk full")

    monkeypatch.setattr(pipe.text_encoder, "export_transformers", broken_export)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


def test_missing_or_incomplete_folders_are_refused_clearly(built, tmp_path):
    _, root, _ = built
    with pytest.raises(PipelineFolderError, match="does not exist"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(PipelineFolderError, match="not a pipeline folder"):
        LatentDiffusionPipeline.from_pretrained(root / "vae")
    broken = tmp_path / "broken"
    shutil.copytree(root / "saved", broken)
    (broken / MANIFEST_NAME).unlink()
    with pytest.raises(PipelineFolderError, match=f"incomplete \\(missing {MANIFEST_NAME}\\).*interrupted"):
        LatentDiffusionPipeline.from_pretrained(broken)


def test_modified_weights_are_a_fingerprint_mismatch(built, tmp_path):
    _, root, _ = built
    flipped = tmp_path / "flipped"
    shutil.copytree(root / "saved", flipped)
    weights = flipped / "unet" / "diffusion_pytorch_model.safetensors"
    flip_bits(weights, -10, 0xFF)  # one byte inside a tensor: safetensors would load it without complaint
    with pytest.raises(PipelineMismatchError, match="fingerprint mismatch.*unet/diffusion_pytorch_model"):
        LatentDiffusionPipeline.from_pretrained(flipped)


def test_swapped_text_encoder_is_a_fingerprint_mismatch(built, tiny_bert, tmp_path):
    """A different text encoder in the folder is caught by its fingerprint, even when the manifest's
    file list was regenerated to match the swapped files."""
    from text_encoder import FingerprintMismatch

    from ldm.manifest import file_digests

    _, root, _ = built
    swapped = tmp_path / "swapped"
    shutil.copytree(root / "saved", swapped)
    for sub in ("text_encoder", "tokenizer"):
        shutil.rmtree(swapped / sub)
        (swapped / sub).mkdir()
    for f in tiny_bert.iterdir():
        shutil.copy(f, swapped / ("tokenizer" if "token" in f.name or f.name == "vocab.txt" else "text_encoder") / f.name)
    manifest = json.loads((swapped / MANIFEST_NAME).read_text())
    manifest["files"] = file_digests(swapped)
    (swapped / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FingerprintMismatch, match="weights_sha256"):
        LatentDiffusionPipeline.from_pretrained(swapped)


def test_bad_requests_are_refused_clearly(built):
    pipe = built[0]
    with pytest.raises(ValueError, match="multiples of the autoencoder's downsampling factor 2"):
        pipe(PROMPTS, height=15, width=16, steps=1)
    with pytest.raises(ValueError, match="choose one of: ddpm, ddim"):
        pipe(PROMPTS, sampler="plms", steps=1)
    with pytest.raises(ValueError, match="negative prompts for 2 prompts"):
        pipe(PROMPTS, negative_prompt=["a", "b", "c"], steps=1)


def test_stages_that_do_not_fit_are_refused(built):
    pipe = built[0]
    wrong = build_unet("tiny", cross_attention_dim=48)
    with pytest.raises(PipelineMismatchError, match="width 48 but the text encoder outputs width 32"):
        LatentDiffusionPipeline(wrong, pipe.vae, pipe.text_encoder, pipe.schedule, vae_dir=pipe.vae_dir)


def test_autoencoder_without_folded_statistics_is_refused(built, tmp_path):
    from autoencoder import AUTOENCODER_PRESETS, LatentContract, build_autoencoder, save_autoencoder

    pipe = built[0]
    cfg = AUTOENCODER_PRESETS["tiny"]
    contract = LatentContract(latent_mean=(0.1,) * 4, latent_std=(2.0,) * 4, folded=False, autoencoder_config=cfg,
                              num_values=1)  # fmt: skip
    save_autoencoder(build_autoencoder(cfg), contract, tmp_path / "unfolded")
    with pytest.raises(PipelineMismatchError, match="not have its latent statistics folded"):
        LatentDiffusionPipeline.from_parts(pipe.unet, tmp_path / "unfolded", pipe.text_encoder, pipe.schedule)


def test_sampler_benchmark_runs(built, capsys, monkeypatch):
    """benchmarks/samplers.py prints one row per sampler and step count (smoke test, no timings asserted)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "samplers.py"
    spec = importlib.util.spec_from_file_location("sampler_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    _, root, _ = built
    bench.main(["--model", str(root / "saved"), "--reference-steps", "12", "--steps", "2", "4",
                "--samplers", "ddim", "dpmpp_2m", "--num-images", "1", "--prompts", "a face"])  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("ddim ", "dpmpp_2m "))]
    assert [(r[0], r[1]) for r in rows] == [("ddim", "2"), ("ddim", "4"), ("dpmpp_2m", "2"), ("dpmpp_2m", "4")]
    assert all(float(r[3]) >= 0 for r in rows)
