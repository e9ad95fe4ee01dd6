"""The recognisability benchmark: emoji classifier (labels, augmentation, training, cache), the
benchmark prompt set, the scores, and benchmarks/demo_quality.py end to end on tiny generated data."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.evaluation.emoji_classifier import (
    ClassifierConfig,
    augment,
    cached_classifier,
    epoch_order,
    load_classifier,
    load_labelled,
    train_classifier,
)
from launch.evaluation.recognisability import benchmark_prompts, compare, recognised, score_pipeline

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"disc": "Shapes", "square": "Shapes", "hbar": "Bars", "vbar": "Bars"}
PALETTE = [(220, 30, 30), (30, 160, 60), (40, 60, 220), (230, 190, 30), (150, 40, 170), (20, 170, 180)]
TINY_CLASSIFIER = ClassifierConfig(resolution=32, width=8, feature_dim=16, epochs=25, batch_size=16, lr=1e-2)


def draw(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 32) -> Image.Image:
    img = np.full((size, size, 3), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(12, 20, size=2)
    inside = {"disc": (yy - cy) ** 2 + (xx - cx) ** 2 <= 64, "square": (abs(yy - cy) <= 7) & (abs(xx - cx) <= 7),
              "hbar": (abs(yy - cy) <= 3) & (abs(xx - cx) <= 11), "vbar": (abs(yy - cy) <= 11) & (abs(xx - cx) <= 3)}
    img[inside[shape]] = colour
    return Image.fromarray(img)


def make_emoji_folder(folder: Path, seed: int = 0) -> Path:
    """24 base "emoji" (4 subcategories in 2 categories), 2 skin-tone variants and a Component, with
    the metadata prepare_data --emoji writes, as an image folder with metadata.jsonl."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(24):
        shape = list(SHAPES)[i % 4]
        name = f"{shape} {i // 4}"
        rows.append({"caption": name, "shape": shape, "colour": PALETTE[i // 4], "tone": None, "cat": SHAPES[shape],
                     "base": f"B{i}"})
        if i < 2:
            rows.append({"caption": f"{name}: dark skin tone", "shape": shape, "colour": (90, 60, 40),
                         "tone": "dark skin tone", "cat": SHAPES[shape], "base": f"B{i}"})
    rows.append({"caption": "light skin tone", "shape": "square", "colour": (250, 220, 180), "tone": None,
                 "cat": "Component", "base": "C"})
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for n, row in enumerate(rows):
            draw(row["shape"], row["colour"], rng).save(folder / f"e{n:03d}.png")
            f.write(json.dumps({"file_name": f"e{n:03d}.png", "text": row["caption"], "category": row["cat"],
                                "subcategory": row["shape"] if row["cat"] != "Component" else "skin-tone",
                                "skin_tone": row["tone"], "sort_order": n, "base": row["base"]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def emoji(tmp_path_factory) -> Path:
    return make_emoji_folder(tmp_path_factory.mktemp("emoji") / "train")


@pytest.fixture(scope="module")
def trained(emoji):
    data = load_labelled(str(emoji), 32)
    return data, train_classifier(data, TINY_CLASSIFIER, log=lambda _: None)


def test_labels_come_from_the_metadata_and_unlabelled_data_is_refused(emoji, captioned_images):
    data = load_labelled(str(emoji), 32)
    assert data.images.shape == (27, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.subcategory.count("disc") == 7 and data.category.count("Component") == 1
    assert sum(not b for b in data.base) == 2
    with pytest.raises(ValueError, match="prepare_data.py --emoji"):
        load_labelled(str(captioned_images), 32)


def test_an_epoch_shows_each_base_emoji_once_whatever_its_variants(emoji):
    data = load_labelled(str(emoji), 32)
    g = torch.Generator().manual_seed(0)
    seen = [epoch_order(data.group, g).tolist() for _ in range(6)]
    for order in seen:
        assert sorted(data.group[i] for i in order) == sorted(set(data.group))  # 25 groups, each once
    variant_group = data.group[[i for i, b in enumerate(data.base) if not b][0]]
    assert len({i for order in seen for i in order if data.group[i] == variant_group}) == 2  # both members get turns


def test_prompts_are_base_emoji_spread_over_categories_without_components(emoji):
    data = load_labelled(str(emoji), 32)
    prompts = benchmark_prompts(data, per_category=3)
    assert prompts.category == ["Bars"] * 3 + ["Shapes"] * 3
    assert not any("skin tone" in p for p in prompts.prompts)
    assert len(set(prompts.prompts)) == 6 and prompts.images.shape[0] == 6
    assert benchmark_prompts(data, per_category=3).prompts == prompts.prompts  # deterministic
    assert len(benchmark_prompts(data, per_category=100).prompts) == 24  # capped by what exists


def test_augmentation_is_seeded_and_changes_images_within_range(emoji):
    x = load_labelled(str(emoji), 32).images[:8].float() / 127.5 - 1
    a = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert (a - x).abs().mean() > 0.02


def test_classifier_learns_the_subcategories(trained):
    data, clf = trained
    pred = clf.predict(data.images)
    base = torch.tensor(data.base)
    accuracy = (pred["subcategory"] == clf.label_ids(data.subcategory, "subcategory"))[base].float().mean()
    # Twice chance at least: training is not bitwise reproducible across thread counts and runs
    # (0.72-0.80 seen on this fixture), so a tighter bar would be a flaky test, not a stricter one.
    assert accuracy >= 0.5, f"subcategory accuracy {accuracy:.2f} on its own training images (chance 0.25)"
    assert pred["features"].shape == (27, 16)


def test_classifier_is_cached_by_data_and_settings(emoji, tmp_path):
    data = load_labelled(str(emoji), 32)
    cfg = ClassifierConfig(resolution=32, width=4, feature_dim=8, epochs=1, batch_size=16)
    messages: list[str] = []
    first, path = cached_classifier(data, cfg, tmp_path, log=messages.append)
    again, path_again = cached_classifier(data, cfg, tmp_path, log=messages.append)
    assert path_again == path and messages[-1].startswith("emoji classifier: cached")
    assert sum("epoch" in m for m in messages) == 1, "the second call must not train again"
    assert torch.equal(first.predict(data.images)["features"], again.predict(data.images)["features"])
    _, other = cached_classifier(data, ClassifierConfig(**{**cfg.__dict__, "seed": 1}), tmp_path, log=messages.append)
    data.subcategory[0] = "square"
    _, relabelled = cached_classifier(data, cfg, tmp_path, log=messages.append)
    assert len({path, other, relabelled}) == 3
    (tmp_path / "not_a_classifier.safetensors").write_bytes(path.read_bytes()[:8] + b"{}" + b" " * 6)
    with pytest.raises(Exception):
        load_classifier(tmp_path / "not_a_classifier.safetensors")
    with pytest.raises(FileNotFoundError, match="demo_quality.py"):
        load_classifier(tmp_path / "missing.safetensors")


def test_real_images_score_ratio_one_and_noise_scores_worse(trained):
    data, clf = trained
    prompts = benchmark_prompts(data, per_category=12)
    real = recognised(clf, prompts.images, prompts)
    same = compare(real, recognised(clf, prompts.images, prompts))
    assert same["subcategory_ratio"] == pytest.approx(1.0) and same["category_ratio"] == pytest.approx(1.0)
    assert same["fd"] == pytest.approx(0.0, abs=1e-3)
    noise = torch.randint(0, 256, prompts.images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = compare(real, recognised(clf, noise, prompts))
    assert bad["fd"] > 1.0 and bad["subcategory_ratio"] < 1.0


class EchoPipeline:
    """Stands in for a pipeline: 'generates' the real image of each prompt, records the requests."""

    def __init__(self, prompts):
        self.by_prompt = {p: Image.fromarray(im.permute(1, 2, 0).numpy()) for p, im in zip(prompts.prompts, prompts.images)}
        self.calls: list[dict] = []

    def generate(self, prompts, num_images_per_prompt, guidance_scale, seed, **kw):
        self.calls.append({"guidance": guidance_scale, "seed": seed, "n": num_images_per_prompt, **kw})
        return [type("G", (), {"image": self.by_prompt[p]}) for p in prompts for _ in range(num_images_per_prompt)]


def test_score_pipeline_scores_every_guidance_scale_with_the_same_seeds(trained, tmp_path):
    data, clf = trained
    prompts = benchmark_prompts(data, per_category=12)
    pipe = EchoPipeline(prompts)
    result = score_pipeline(pipe, clf, prompts, (1.0, 4.5), steps=3, seed=7, per_prompt=2, grid=tmp_path / "q.png")
    assert list(result["guidance"]) == ["1", "4.5"]
    assert [c["guidance"] for c in pipe.calls] == [1.0, 4.5] and {c["seed"] for c in pipe.calls} == {7}
    for r in result["guidance"].values():  # each real image twice: the same mean, covariance scaled by (N-1)/N
        assert r["subcategory_ratio"] == pytest.approx(1.0) and r["fd"] == pytest.approx(0.0, abs=0.05)
        assert r["per_category_subcategory_acc"] == pytest.approx(result["real"]["per_category_subcategory_acc"])
    assert set(result["real"]["per_category_subcategory_acc"]) == set(prompts.category)
    # The grid: 4 prompts a row, each the real image then its 2 generated ones (here copies of it).
    n, side = len(prompts.prompts), prompts.images.shape[-1]
    grid = torch.from_numpy(np.asarray(Image.open(tmp_path / "q_g4.5.png"))).permute(2, 0, 1)
    assert (tmp_path / "q_g1.png").is_file()
    assert grid.shape[1] == -(-n // 4) * (side + 2)
    first = grid[:, :side, : 3 * side]
    for k in range(3):
        assert torch.equal(first[:, :, k * side:(k + 1) * side], prompts.images[0])


def test_per_category_accuracy_counts_each_category_of_the_prompts(trained):
    data, clf = trained
    prompts = benchmark_prompts(data, per_category=12)
    images = prompts.images.clone()
    first = prompts.category[0]
    wrong = torch.tensor([c == first for c in prompts.category])
    images[wrong] = torch.randint(0, 256, images[wrong].shape, generator=torch.Generator().manual_seed(1),
                                  dtype=torch.uint8)
    real = recognised(clf, prompts.images, prompts)["per_category_subcategory_acc"]
    mixed = recognised(clf, images, prompts)["per_category_subcategory_acc"]
    assert {c: mixed[c] for c in mixed if c != first} == {c: real[c] for c in real if c != first}
    assert mixed[first] < real[first]


def load_benchmark(monkeypatch):
    path = ROOT / "benchmarks" / "demo_quality.py"
    spec = importlib.util.spec_from_file_location("demo_quality_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_command_end_to_end(emoji, tiny_pipeline_root, tmp_path, monkeypatch, capsys):
    bench = load_benchmark(monkeypatch)
    args = ["--model", str(tiny_pipeline_root / "pipe"), "--data", str(emoji), "--val-data", str(emoji),
            "--cache-dir", str(tmp_path / "cache"), "--classifier.resolution", "32", "--classifier.width", "4",
            "--classifier.feature-dim", "8", "--classifier.epochs", "1", "--per-category", "3",
            "--guidance", "1", "3", "--steps", "2", "--json", str(tmp_path / "out.json")]
    result = bench.main(args)
    out = capsys.readouterr().out
    assert "6 prompts x 1 image(s)" in out and len([ln for ln in out.splitlines() if ln.split()[:1] in (["1"], ["3"])]) == 2
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["guidance"].keys() == {"1", "3"} and saved["prompts"] == 6
    assert "autoenc." in out and np.isfinite(saved["autoencoder"]["fd"])  # real images through the autoencoder
    by_category = out.split("subcategory accuracy by category")[1].split("\n(")[0].splitlines()[2:]
    assert {ln.rsplit(None, 3)[0] for ln in by_category} == set(saved["real"]["per_category_subcategory_acc"])
    for r in saved["guidance"].values():
        real = saved["real"]["subcategory_acc"]
        assert r["subcategory_ratio"] == pytest.approx(r["subcategory_acc"] / max(real, 1e-9))
        assert np.isfinite(r["fd"])
    assert result["classifier"].startswith(str(tmp_path / "cache"))
    bench.main(args)
    assert "emoji classifier: cached" in capsys.readouterr().out


def test_train_ldm_eval_every_logs_the_scores(emoji, tiny_autoencoder, tmp_path, capsys):
    from launch.train_ldm import main as train_main
    from launch.training.tracking import read_metrics

    data = load_labelled(str(emoji), 32)
    _, classifier = cached_classifier(data, ClassifierConfig(resolution=32, width=4, feature_dim=8, epochs=1),
                                      tmp_path / "cache", log=lambda _: None)
    args = ["--preset", "tiny", "--data.source", str(emoji), "--vae", str(tiny_autoencoder), "--text-encoder",
            "minilm", "--run.output-dir", str(tmp_path / "run"), "--sample-every", "100", "--eval-every", "4"]
    with pytest.raises((SystemExit, ValueError)) as refused:  # at parse time (tyro exits) or at the start
        train_main(args)
    assert re.search(r"needs\s+--eval-classifier", capsys.readouterr().err.replace("│", " ") + str(refused.value))
    train_main(args + ["--eval-classifier", str(classifier), "--eval-per-category", "2", "--eval-guidance", "1", "3"])
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "quality_fd_g3" in r]
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        for key in ("quality_subcategory_ratio_g1", "quality_category_ratio_g3", "quality_fd_g1"):
            assert np.isfinite(r[key]), key
