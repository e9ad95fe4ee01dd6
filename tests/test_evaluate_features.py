"""launch/eval_features.py and eval_metrics.py in isolation: open_clip specs resolve to local files
or skip without touching the network, pickles need permission, and the process split covers every
image exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY_OPEN_CLIP

from launch.evaluation.features import FeatureUnavailable, _resolve_openclip, load_openclip
from launch.evaluation.distances import frechet_distance, kernel_distance, share

ARCH = "TinyCLIP-evaluate-test"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("openclip")
    (root / f"{ARCH}.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(root / f"{ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny.safetensors"))
    return root / "tiny.safetensors"


def test_registered_arch_with_a_local_file_loads_and_scores(weights):
    clip = load_openclip(f"openclip:{ARCH}@{weights}", "cpu")
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    assert clip.image_embeddings(images).shape == (2, 16) and clip.text_embeddings(["a", "b"]).shape == (2, 16)
    assert clip.weights["file"] == str(weights) and len(clip.weights["sha256"]) == 64


def test_uncached_tag_is_unavailable_without_network(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FeatureUnavailable, match="not in the Hugging Face cache"):
        _resolve_openclip("openclip:ViT-B-32@laion2b_s34b_b79k", allow_pickle=False)


def test_bad_specs_are_errors_not_skips(weights, tmp_path):
    pickled = tmp_path / "tiny.bin"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match="--allow-pickle-weights"):
        _resolve_openclip(f"openclip:{ARCH}@{pickled}", allow_pickle=False)
    assert _resolve_openclip(f"openclip:{ARCH}@{pickled}", allow_pickle=True)[1] == pickled
    with pytest.raises(FileNotFoundError):
        _resolve_openclip(f"openclip:{ARCH}@{tmp_path / 'missing.safetensors'}", allow_pickle=False)
    with pytest.raises(ValueError, match="not a pretrained tag"):
        _resolve_openclip("openclip:ViT-B-32@no_such_tag", allow_pickle=False)
    with pytest.raises(ValueError, match="open_clip spec"):
        _resolve_openclip("minilm", allow_pickle=False)


def test_process_blocks_cover_every_image_once():
    for n in (1, 7, 128):
        for world in (1, 2, 3, 8):
            blocks = [share(n, rank, world) for rank in range(world)]
            assert [i for start, stop in blocks for i in range(start, stop)] == list(range(n))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def test_distances_separate_shifted_sets_and_kid_is_reproducible():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(64, 8, generator=generator)
    shifted = torch.randn(64, 8, generator=generator) + 1.0
    assert abs(frechet_distance(real, real.clone())) < 1e-6
    assert frechet_distance(real, shifted) == pytest.approx(8.0, rel=0.3)  # |mean shift|^2 = 8
    first, again = (kernel_distance(real, shifted, subsets=10, subset_size=32, seed=0) for _ in range(2))
    assert first == again and first["mean"] > 10 * abs(kernel_distance(real, real, 10, 32, 0)["mean"])
    assert frechet_distance(real[:1], shifted) == {"skipped": "needs at least 2 real and generated images, got 1 and 64"}
