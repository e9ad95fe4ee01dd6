"""Does the demo pipeline draw what it is asked? Recognisability of generated emoji.

    python benchmarks/demo_quality.py --model runs/demo/ldm/pipeline
    python benchmarks/demo_quality.py --model runs/demo/ldm/pipeline --guidance 1 3 5 8 --json out.json

For a fixed set of prompts drawn from the training captions (``--per-category`` base emoji of every
category of emoji.json but "Component", evenly spaced in its sort order), it generates one image
per prompt at each guidance scale and asks a small classifier of the emoji's subcategory and
category how often it recognises the prompt's emoji, against its accuracy on the real images of the
same prompts: the ratio is the number (1.0: as recognisable as the real emoji; the "autoenc." row is
the real images through the pipeline's autoencoder, the most a perfect UNet could reach). Beside it, the
Frechet distance between real and generated images in the classifier's 128-d features (lower is
better; with ~100 images per set it is biased upwards, so compare runs at the same --per-category).

The classifier (launch/evaluation/emoji_classifier.py) is trained once on --data with augmentation
and cached in --cache-dir under a name derived from the data and its settings (a few minutes on 2
CPU cores the first time). Its accuracy on --val-data (emoji it never saw, of known subcategories)
is printed so you know how far to trust it. The data comes from
``python launch/prepare_data.py --emoji runs/demo/data``. On a busy machine run it with
OMP_NUM_THREADS=1: the classifier's small convolutions lose more to thread contention than they gain.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/demo_quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from launch.evaluation.emoji_classifier import ClassifierConfig, cached_classifier, load_labelled
from launch.evaluation.recognisability import benchmark_prompts, score_pipeline
from ldm.cli import parse_config, to_dict


@dataclass
class DemoQualityConfig:
    """Recognisability of a pipeline's emoji: classifier accuracy on generated vs real images, and FD."""

    model: Path = Path("runs/demo/ldm/pipeline")
    """The pipeline folder to judge (train_ldm's OUTPUT/pipeline or launch/posthoc_ema.py's output)."""
    data: str = "runs/demo/data/train"
    """The emoji training split: the classifier trains on it and the prompts come from it."""
    val_data: str = "runs/demo/data/val"
    """Held-out emoji for the classifier's own accuracy (empty: skip)."""
    cache_dir: Path = Path("cache/emoji_classifier")
    """Where the trained classifier is cached (keyed by the data and --classifier.* settings)."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    """The emoji classifier's architecture and training (a change trains and caches a new one)."""
    per_category: int = 12
    """Prompts per emoji category (9 categories: 108 prompts at 12)."""
    guidance: tuple[float, ...] = (1.0, 4.0, 7.0)
    """Classifier-free guidance scales to score."""
    steps: int = 15
    """Sampling steps per image (15 keeps three guidance scales x 108 prompts to minutes on 2 CPU cores)."""
    sampler: str | None = None
    """Default: the pipeline's own default sampler."""
    seed: int = 0
    """Image k of the set uses seed + k (the same at every guidance scale)."""
    images_per_prompt: int = 1
    """Generated images per prompt (the real set has one per prompt)."""
    batch_size: int = 36
    """Images generated per batch."""
    device: str = "cpu"
    """Where the pipeline samples (cpu, cuda)."""
    json: Path | None = None
    """Also write every number (and the settings) to this JSON file."""
    grid: Path | None = None
    """Also save the images: GRID_g4.png per guidance scale, each prompt's real image then its generated ones."""


def split_accuracy(clf, data) -> dict[str, float]:
    """The classifier's accuracy on every (clean) image of a labelled split."""
    pred = clf.predict(data.images)
    return {k: (pred[k] == clf.label_ids(getattr(data, k), k)).float().mean().item() for k in ("subcategory", "category")}


def print_table(result: dict) -> None:
    real = result["real"]
    print(f"\n{result['prompts']} prompts x {result['images_per_prompt']} image(s); real images: subcategory "
          f"{real['subcategory_acc']:.3f}, category {real['category_acc']:.3f}")
    print(f"{'guidance':>8} {'sub acc':>8} {'sub ratio':>9} {'cat acc':>8} {'cat ratio':>9} {'FD':>9}")
    rows = [("autoenc.", result["autoencoder"])] if "autoencoder" in result else []
    for label, r in rows + list(result["guidance"].items()):
        print(f"{label:>8} {r['subcategory_acc']:8.3f} {r['subcategory_ratio']:9.3f} {r['category_acc']:8.3f} "
              f"{r['category_ratio']:9.3f} {r['fd']:9.2f}")
    scales = list(result["guidance"])
    print("\nsubcategory accuracy by category: real images, then generated at each guidance scale")
    print(f"{'category':<20} {'real':>6} " + " ".join(f"{'g' + g:>6}" for g in scales))
    for cat, acc in real["per_category_subcategory_acc"].items():
        print(f"{cat:<20} {acc:6.2f} " + " ".join(
            f"{result['guidance'][g]['per_category_subcategory_acc'][cat]:6.2f}" for g in scales))


def main(args: list[str] | None = None) -> dict:
    cfg = parse_config(DemoQualityConfig, args=args)
    from ldm.pipeline import LatentDiffusionPipeline

    if not cfg.model.is_dir():
        raise SystemExit(f"--model {cfg.model} is not a folder: pass a pipeline folder (e.g. runs/demo/ldm/pipeline)")
    start = time.time()
    data = load_labelled(cfg.data, cfg.classifier.resolution)
    clf, clf_path = cached_classifier(data, cfg.classifier, cfg.cache_dir)
    prompts = benchmark_prompts(data, cfg.per_category)
    info = {"classifier": str(clf_path), "classifier_train_acc": split_accuracy(clf, data)}
    if cfg.val_data:
        info["classifier_val_acc"] = split_accuracy(clf, load_labelled(cfg.val_data, cfg.classifier.resolution))
        print(f"classifier on held-out emoji ({cfg.val_data}): subcategory "
              f"{info['classifier_val_acc']['subcategory']:.3f}, category {info['classifier_val_acc']['category']:.3f}")
    pipe = LatentDiffusionPipeline.from_pretrained(cfg.model, device=cfg.device)
    with torch.inference_mode():
        result = score_pipeline(pipe, clf, prompts, cfg.guidance, steps=cfg.steps, sampler=cfg.sampler,
                                seed=cfg.seed, per_prompt=cfg.images_per_prompt, batch_size=cfg.batch_size,
                                autoencoder_row=True, grid=cfg.grid)
    result.update(info, model=str(cfg.model), manifest_id=pipe.manifest_id, settings=to_dict(cfg),
                  seconds=round(time.time() - start, 1))
    print_table(result)
    print(f"({result['seconds']:.0f} s)")
    if cfg.json:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
