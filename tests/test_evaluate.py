"""launch/evaluate.py end to end on a tiny untrained pipeline, with tiny random feature extractors.

The numbers are meaningless (random weights everywhere); what is tested is that every metric's
code path runs, the report has its promised shape, offline skips say why, and the maths holds by
identity: images equal to the reals give a Fréchet distance of about 0, and our Inception route
gives torchmetrics' own FID.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from tiny import TINY_OPEN_CLIP, make_captioned_folder, perturbed, tiny_autoencoder_dir, tiny_pipeline

PROMPT = "a red disc"
N = 4  # images per guidance scale
SCALE = 3.0  # the guidance scale the "real" images were made with


def random_inception_state() -> dict[str, torch.Tensor]:
    """torch-fidelity's FID network with random weights (variance-preserving, so features are not ~0)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    no_load = mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
    with no_load, mock.patch.object(fidelity, "load_state_dict_from_url", return_value=None):
        torch.manual_seed(0)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def tiny_openclip_dir(root: Path) -> Path:
    import open_clip

    folder = root / "openclip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    model = perturbed(open_clip.create_model(f"local-dir:{folder}", load_weights=False))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def generated_as_reals(pipeline: Path, folder: Path) -> Path:
    """The pipeline's own images at SCALE, saved as a captioned folder: seed k -> image k."""
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(pipeline)
    folder.mkdir()
    for k, g in enumerate(pipe.generate([PROMPT] * N, steps=2, guidance_scale=SCALE, seed=0)):
        g.image.save(folder / f"img{k:03d}.png")
        (folder / f"img{k:03d}.txt").write_text(PROMPT)
    return folder


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    images = make_captioned_folder(root / "images", n=8, size=32)
    vae = tiny_autoencoder_dir(root / "vae", images)
    pipeline = root / "pipeline"
    tiny_pipeline(root, vae=vae, sample_size=16).save_pretrained(pipeline)  # 32 px through the f2 autoencoder
    return {"images": images, "vae": vae, "pipeline": pipeline, "openclip": tiny_openclip_dir(root),
            "reals": generated_as_reals(pipeline, root / "reals")}  # fmt: skip


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    pytest.importorskip("torch_fidelity", reason="torchmetrics' Inception needs torch-fidelity")
    path = tmp_path_factory.mktemp("inception") / "inception_random.safetensors"
    save_file(random_inception_state(), str(path))
    return path


def common_args(stages, out: Path) -> list[str]:
    return ["--model", str(stages["pipeline"]), "--num-images", str(N), "--steps", "2", "--batch-size", "4",
            "--kid-subsets", "5", "--out", str(out)]  # fmt: skip


def test_end_to_end_report_and_identical_sets_give_zero_distance(stages, tmp_path):
    from launch.evaluate import main

    clip = f"openclip:local-dir:{stages['openclip']}"
    # Inception at 299 px costs ~1 s per image on this CPU: its route is tested on 4 images below.
    main(common_args(stages, tmp_path) + [
        "--data", str(stages["reals"]), "--guidance", "1", str(SCALE), "--inception-weights", "none",
        "--clip", clip, "--feature-openclip", clip,
    ])  # fmt: skip
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["task"] == "text_to_image" and report["skipped"] == {}
    assert set(report["feature_spaces"]) == {"vae", "openclip"}
    assert all(label["description"] and label["dim"] > 0 for label in report["feature_spaces"].values())
    assert report["manifest_id"] and report["sampler"] == "dpmpp_2m" and report["steps"] == 2
    assert report["num_images"] == N and report["num_real"] == N and report["seed"] == 0
    assert report["clip_score"]["model"] == clip
    assert [row["guidance_scale"] for row in report["results"]] == [1.0, SCALE]
    for row in report["results"]:
        assert row["num_generated"] == N and isinstance(row["clip_score"], float)
        assert set(row["fid"]) == set(row["kid"]) == {"vae", "openclip"}
        assert all(set(kid) == {"mean", "std", "subset_size"} for kid in row["kid"].values())
        assert (tmp_path / row["grid"]).is_file()
    different, same = report["results"]
    for space in ("vae", "openclip"):
        assert abs(same["fid"][space]) < 1e-3, (space, same["fid"][space])  # generated == reals
        assert different["fid"][space] > 100 * max(abs(same["fid"][space]), 1e-6), space
    assert (tmp_path / report["plot"]).is_file() and (tmp_path / "config.json").is_file()


def test_offline_every_unavailable_metric_is_skipped_with_its_reason(stages, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from launch.evaluate import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no Inception weights here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    captions = tmp_path / "prompts.txt"
    captions.write_text("a red disc\na blue square\n")
    main(common_args(stages, tmp_path / "eval") + ["--captions", str(captions), "--guidance", "1", "2"])
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    skipped = report["skipped"]
    if importlib.util.find_spec("torch_fidelity") is None:
        assert "torch-fidelity is not installed" in skipped["fid/kid [inception]"]
    else:
        assert "weights-inception-2015-12-05-6726825d.pth" in skipped["fid/kid [inception]"]
        assert str(tmp_path / "empty_torch_home") in skipped["fid/kid [inception]"]
    assert "Hugging Face cache" in skipped["clip_score"] and "ViT-B-32" in skipped["clip_score"]
    assert "--data" in skipped["real_images"]
    assert "openclip" not in report["feature_spaces"]  # not asked for: not reported
    for row in report["results"]:
        assert row["num_generated"] == N and "skipped" in row["clip_score"]
        assert "skipped" in row["fid"]["inception"] and "no real images" in row["fid"]["vae"]["skipped"]
    assert report["plot"] == {"skipped": "no Fréchet distance could be computed"}


def test_vae_distance_against_other_reals_is_plotted_against_guidance(stages, tmp_path):
    from launch.evaluate import main

    main(common_args(stages, tmp_path) + ["--data", str(stages["images"]), "--guidance", "1", "2", "--clip", "none",
                                          "--inception-weights", "none"])  # fmt: skip
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report["feature_spaces"]) == {"vae"} and report["prompts"].startswith("captions of --data")
    assert all(row["fid"]["vae"] > 0 for row in report["results"])
    assert report["clip_score"] == {"skipped": "turned off (--clip none)"}
    assert report["plot"] == "guidance_tradeoff.png" and (tmp_path / "guidance_tradeoff.png").is_file()


def test_inception_route_equals_torchmetrics_fid_on_images(inception_file):
    """Our route (features -> gather -> FID on features) gives what torchmetrics' stock metric gives,
    and the report notes that these are not the published weights. (Each 2048-d FID costs a ~4 s
    eigendecomposition here, so the identical-sets check is left to the smaller spaces above.)"""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from safetensors.torch import load_file
    from torchmetrics.image.fid import FrechetInceptionDistance

    from launch.evaluation.features import inception_space
    from launch.evaluation.distances import frechet_distance

    generator = torch.Generator().manual_seed(0)
    real, fake = (torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(2))
    space = inception_space(str(inception_file), "cpu")
    real_features, fake_features = space.encode(real), space.encode(fake)
    with mock.patch.object(fidelity, "load_state_dict_from_url", return_value=load_file(str(inception_file))):
        stock = FrechetInceptionDistance(feature=2048)
    stock.update(real, real=True)
    stock.update(fake, real=False)
    ours = frechet_distance(real_features, fake_features)
    assert ours == pytest.approx(float(stock.compute()), rel=1e-4) and ours > 1e-3
    assert not space.weights["published_fid_weights"] and "not the published" in space.notes[0]


def test_autoencoder_reconstruction_report(stages, tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    from launch.evaluate import main

    torch.manual_seed(0)
    trunk = tmp_path / "vgg16_random.pth"  # LPIPS reads only the `features.*` part of torchvision's VGG16
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, trunk)
    main(["--autoencoder", str(stages["vae"]), "--data", str(stages["images"]), "--num-images", "6", "--batch-size", "4",
          "--inception-weights", "none", "--lpips-weights", str(trunk), "--kid-subsets", "5",
          "--out", str(tmp_path)])  # fmt: skip
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["task"] == "autoencoder" and report["num_real"] == 6 and report["skipped"] == {}
    (row,) = report["results"]
    assert all(isinstance(row[k], float) for k in ("psnr", "ssim", "lpips"))
    assert row["fid"]["vae"] > 0 and (tmp_path / row["grid"]).is_file()
