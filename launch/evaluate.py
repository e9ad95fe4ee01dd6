"""Evaluate a text-to-image pipeline (FID, KID, CLIP score across guidance scales) or an autoencoder.

    accelerate launch launch/evaluate.py --model runs/demo/ldm/pipeline --data runs/demo/data/val \
        --num-images 128 --steps 20 --guidance 1 3 6 --out runs/demo/eval
    accelerate launch launch/evaluate.py --autoencoder runs/demo/vae/model --data runs/demo/data/val

Every process generates (or reconstructs) its own block of images and encodes it; the features
are gathered and the main process computes the metrics and writes ``OUT/metrics.json``,
``OUT/guidance_tradeoff.png`` (FID vs CLIP score) and one sample grid per guidance scale. Image k
uses seed ``--seed + k`` at every guidance scale, so the scales differ only in guidance. A metric
whose weights are not on this machine (Inception, CLIP, LPIPS offline) is reported as
{"skipped": reason}; the rest is computed and the command exits 0. The feature spaces are
described in launch/eval_features.py, the report format in launch/eval_report.py.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/evaluate.py` / `accelerate launch launch/evaluate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm.auto import tqdm

from data import DataConfig, iterate_once
from launch.evaluation import features
from launch.evaluation.features import cat_rows, encode_all, pil_to_uint8, to_uint8
from launch.evaluation.distances import clip_scores, compare_sets, gather_rows, share, skipped
from launch.evaluation.reconstruction import evaluate_autoencoder
from foundation import write_json_atomic
from launch.evaluation.report import collect_skipped, plot_tradeoff, summary_lines
from launch.evaluation.pictures import labelled_grid
from launch.training.accelerator import setup_accelerator
from launch.training.config import RunConfig
from ldm.cli import parse_config, save_config, to_dict


@dataclass
class EvaluateConfig:
    """Evaluate a pipeline (--model: FID/KID/CLIP score per guidance scale) or an autoencoder (--autoencoder)."""

    model: Path | None = None
    """Pipeline folder written by launch/train_ldm.py."""
    autoencoder: Path | None = None
    """Stage-1 autoencoder folder: reconstruction metrics (PSNR, SSIM, rFID, LPIPS) on --data instead."""
    data: str = ""
    """--data spec of a validation split: its images are the reals, its captions the prompts (unless --captions)."""
    captions: Path | None = None
    """Prompts, one per line (cycled up to --num-images); without --data, FID/KID are skipped."""
    num_images: int = 1000
    """Images per guidance scale (and reals), over all processes."""
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0, 6.0])
    """Guidance scales; every metric is reported per scale."""
    sampler: str | None = None
    """None: the pipeline's default sampler."""
    steps: int = 25
    """Sampler steps per image."""
    seed: int = 0
    """Image k is generated with seed + k at every guidance scale; also seeds KID's subsets."""
    batch_size: int = 16
    """Images generated (or reconstructed) per batch, per process."""
    resolution: int = 0
    """0: the model's own size (UNet sample size x autoencoder factor, or the autoencoder's sample_size)."""
    inception_weights: str = "auto"
    """FID's Inception weights: auto (torch.hub cache, skipped when absent), none, or a file."""
    clip: str = "openclip:ViT-B-32@laion2b_s34b_b79k"
    """CLIP score model (open_clip spec: ARCH@TAG from the HF cache, ARCH@FILE, local-dir:DIR); none: off."""
    feature_vae: str = "auto"
    """Fréchet distance in an autoencoder's encoder features: auto (the evaluated model's vae), none, or a folder."""
    feature_openclip: str = "none"
    """Fréchet distance in an open_clip image tower's features (same spec syntax as --clip); none: off."""
    lpips_weights: str = "auto"
    """Autoencoder mode: LPIPS VGG trunk weights (auto: torchvision's cache, skipped when absent), none, or a file."""
    kid_subsets: int = 100
    """KID is averaged over this many random subsets (Binkowski et al. 2018)."""
    kid_subset_size: int = 1000
    """Images per KID subset (capped at the number of images)."""
    grid_images: int = 16
    """Images per guidance scale shown in the report's grids."""
    allow_pickle_weights: bool = False
    """Allow .bin/.pt/.pth weights other than the published FID Inception file (read with weights_only=True)."""
    out: Path = Path("runs/eval")
    """Folder for the report, the metrics JSON and the grids."""
    cpu: bool = False
    """Force the CPU even when a GPU is present."""


PRESETS: dict[str, EvaluateConfig] = {
    "quick": EvaluateConfig(num_images=128, steps=20, guidance=[1.0, 3.0, 6.0], kid_subset_size=100),
    "standard": EvaluateConfig(num_images=10_000, steps=25, guidance=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]),
}


def check_config(cfg: EvaluateConfig) -> None:
    if (cfg.model is None) == (cfg.autoencoder is None):
        raise SystemExit("give exactly one of --model PIPELINE_DIR or --autoencoder AUTOENCODER_DIR")
    if cfg.autoencoder is not None and not cfg.data:
        raise SystemExit("--autoencoder needs --data SPEC: the validation images to reconstruct")
    if cfg.model is not None and not cfg.data and cfg.captions is None:
        raise SystemExit("give the prompts: --captions FILE (one per line) or --data SPEC (its captions)")
    if cfg.num_images < 1 or cfg.batch_size < 1 or not cfg.guidance:
        raise SystemExit("--num-images and --batch-size must be at least 1 and --guidance needs a scale")
    if cfg.captions is not None and not cfg.captions.is_file():
        raise SystemExit(f"--captions {cfg.captions}: no such file")


# ---------------------------------------------------------------------------------------------
# feature spaces and CLIP, each either built or skipped with its reason


def _disabled(value: str) -> bool:
    return value.strip().lower() in ("", "none", "off")


def load_clip(spec: str, device, allow_pickle: bool) -> tuple[features.OpenClip | None, dict[str, Any]]:
    if _disabled(spec):
        return None, skipped("turned off (--clip none)")
    try:
        clip = features.load_openclip(spec, device, allow_pickle)
    except features.FeatureUnavailable as e:
        return None, skipped(str(e))
    definition = "mean over images of max(100 * cos(CLIP image embedding, prompt embedding), 0)"
    return clip, {"model": spec, "definition": definition, "weights": clip.weights}


def build_spaces(cfg: EvaluateConfig, device, own_vae: Path, clip: features.OpenClip | None):
    """({name: FeatureSpace} that could be built, {name: label or {"skipped": reason}})."""
    makers = {
        "inception": (cfg.inception_weights, lambda: features.inception_space(
            cfg.inception_weights, device, cfg.allow_pickle_weights)),
        "vae": (cfg.feature_vae, lambda: features.vae_space(
            own_vae if cfg.feature_vae == "auto" else Path(cfg.feature_vae), device)),
        "openclip": (cfg.feature_openclip, lambda: features.openclip_space(
            clip if clip is not None and cfg.feature_openclip == cfg.clip
            else features.load_openclip(cfg.feature_openclip, device, cfg.allow_pickle_weights))),
    }  # fmt: skip
    spaces, labels = {}, {}
    for name, (option, make) in makers.items():
        if _disabled(option):
            continue  # not asked for: neither computed nor reported as skipped
        try:
            spaces[name] = make()
            labels[name] = spaces[name].label()
        except features.FeatureUnavailable as e:
            labels[name] = skipped(str(e))
    return spaces, labels


# ---------------------------------------------------------------------------------------------
# text to image


def read_reals(cfg: EvaluateConfig, acc, size: int, count: int, spaces) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The first ``count`` samples of this rank's share of --data: (captions, {space: features})."""
    data = DataConfig(source=cfg.data, resolution=size, crop="center",
                      missing_caption="empty" if cfg.captions or cfg.autoencoder else "skip")  # fmt: skip
    captions: list[str] = []
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in spaces}
    for batch in iterate_once(data, batch_size=cfg.batch_size, rank=acc.process_index, world_size=acc.num_processes):
        take = min(count - len(captions), len(batch["captions"]))
        captions += list(batch["captions"][:take])
        for name, feats in encode_all(spaces, to_uint8(batch["pixel_values"][:take])).items():
            parts[name].append(feats)
        if len(captions) >= count:
            break
    return captions, {name: cat_rows(p, spaces[name].dim) for name, p in parts.items()}


def prompts_and_reals(cfg: EvaluateConfig, acc, size: int, spaces) -> tuple[list[str], int, dict[str, Any]]:
    """(this rank's prompts, the global index of its first image, {"count", "features"} of all reals)."""
    start, stop = share(cfg.num_images, acc.process_index, acc.num_processes)
    real: dict[str, Any] = {"count": 0, "features": None}
    if cfg.data:
        captions, parts = read_reals(cfg, acc, size, stop - start, spaces)
        real["count"] = int(gather_rows(acc, torch.tensor([len(captions)])).sum())
        real["features"] = {name: gather_rows(acc, f).cpu() for name, f in parts.items()}
    if cfg.captions is not None:
        lines = [ln.strip() for ln in cfg.captions.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise SystemExit(f"--captions {cfg.captions} has no prompt")
        return [lines[k % len(lines)] for k in range(start, stop)], start, real
    return captions, start, real


def generate_and_encode(cfg, acc, pipe, scale: float, prompts: list[str], first: int, spaces, clip, size: int):
    """This rank's images at one guidance scale: ({space: features}, CLIP scores [n], grid images)."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in spaces}
    scores: list[torch.Tensor] = []
    shown: list = []
    bar = tqdm(total=len(prompts), desc=f"guidance {scale:g}", disable=not acc.is_local_main_process)
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        out = pipe.generate(chunk, steps=cfg.steps, sampler=cfg.sampler, guidance_scale=scale, height=size,
                            width=size, seed=cfg.seed + first + start, batch_size=cfg.batch_size)  # fmt: skip
        images = pil_to_uint8([g.image for g in out])
        for name, feats in encode_all(spaces, images).items():
            parts[name].append(feats)
        if clip is not None:
            scores.append(clip_scores(clip, images, chunk).cpu())
        shown += [g.image for g in out][: cfg.grid_images - len(shown)]
        bar.update(len(chunk))
    bar.close()
    fake = {name: gather_rows(acc, cat_rows(p, spaces[name].dim)).cpu() for name, p in parts.items()}
    clip_rows = gather_rows(acc, torch.cat(scores) if scores else torch.empty(0)).cpu() if clip is not None else None
    return fake, clip_rows, shown


def score_scale(cfg, scale: float, real, fake, scores, labels, clip_label, seconds: float) -> dict[str, Any]:
    """One row of the report; spaces that could not be built keep their {"skipped": reason}."""
    n = max([len(f) for f in fake.values()] + [0 if scores is None else len(scores)])
    row: dict[str, Any] = {"guidance_scale": scale, "num_generated": n}
    unbuilt = {name: label for name, label in labels.items() if "skipped" in label}
    if real is None:
        reason = skipped("no real images: pass --data SPEC")
        row.update(fid={**unbuilt, **{s: reason for s in fake}}, kid={**unbuilt, **{s: reason for s in fake}})
    else:
        scores_by_space = compare_sets(real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
        row.update(fid={**unbuilt, **scores_by_space["fid"]}, kid={**unbuilt, **scores_by_space["kid"]})
    row["clip_score"] = clip_label if scores is None else float(scores.mean()) if len(scores) else skipped("no images")
    row["seconds"] = round(seconds, 2)
    return row


def evaluate_pipeline(cfg: EvaluateConfig, acc) -> dict[str, Any]:
    from ldm.pipeline import LatentDiffusionPipeline
    from ldm.samplers import build_sampler

    pipe = LatentDiffusionPipeline.from_pretrained(cfg.model, device=acc.device)
    build_sampler(cfg.sampler or pipe.default_sampler, pipe.schedule)  # an unknown name fails before any work
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.factor
    clip, clip_label = load_clip(cfg.clip, acc.device, cfg.allow_pickle_weights)
    spaces, labels = build_spaces(cfg, acc.device, Path(cfg.model) / "vae", clip)
    prompts, first, real = prompts_and_reals(cfg, acc, size, spaces)
    results = []
    for scale in cfg.guidance:
        t0 = time.time()
        fake, scores, shown = generate_and_encode(cfg, acc, pipe, scale, prompts, first, spaces, clip, size)
        if not acc.is_main_process:
            continue  # the features are gathered; the main process computes the metrics
        row = score_scale(cfg, scale, real["features"], fake, scores, labels, clip_label, time.time() - t0)
        if shown:
            row["grid"] = f"samples_guidance_{scale:g}.png"
            labelled_grid(shown, prompts[: len(shown)], ncol=min(8, len(shown))).save(Path(cfg.out) / row["grid"])
        results.append(row)
    return {
        "task": "text_to_image", "model": str(cfg.model), "manifest_id": pipe.manifest_id,
        "sampler": cfg.sampler or pipe.default_sampler, "steps": cfg.steps, "seed": cfg.seed,
        "seeds": f"image k uses seed {cfg.seed} + k, k = 0..{cfg.num_images - 1}, at every guidance scale",
        "num_images": cfg.num_images, "num_real": real["count"], "image_size": size, "num_processes": acc.num_processes,
        "prompts": f"captions of --data {cfg.data}" if cfg.captions is None else f"--captions {cfg.captions} (cycled)",
        "real_images": f"--data {cfg.data}: the first images of each process's share, centre-cropped to {size}"
        if cfg.data else skipped("no --data: FID/KID need real images"),
        "feature_spaces": labels, "clip_score": clip_label, "results": results,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------


def evaluate(cfg: EvaluateConfig) -> dict[str, Any] | None:
    """Run the evaluation; returns the report on the main process (None on the others)."""
    check_config(cfg)
    acc = setup_accelerator(RunConfig(output_dir=cfg.out, cpu=cfg.cpu, mixed_precision="no", report_to="none"))
    out = Path(cfg.out)
    if acc.is_main_process:
        save_config(cfg, out / "config.json")
    t0 = time.time()
    if cfg.model is not None:
        report = evaluate_pipeline(cfg, acc)
    else:
        spaces, labels = build_spaces(cfg, acc.device, Path(cfg.autoencoder), clip=None)
        report = evaluate_autoencoder(cfg, acc, spaces, labels)
    acc.wait_for_everyone()
    acc.end_training()  # no collectives follow; left to interpreter exit, gloo can abort a rank
    if not acc.is_main_process:
        return None
    report["seconds"] = round(time.time() - t0, 1)
    report["notes"] = notes(report)
    report["skipped"] = collect_skipped(report)
    if report["task"] == "text_to_image":
        plot = plot_tradeoff(report, out / "guidance_tradeoff.png")
        report["plot"] = plot.name if plot else skipped("no Fréchet distance could be computed")
    report["config"] = to_dict(cfg)
    write_json_atomic(out / "metrics.json", report, sort_keys=False)
    for line in summary_lines(report):
        acc.print(line)
    acc.print(f"wrote {out / 'metrics.json'}")
    return report


def notes(report: dict[str, Any]) -> list[str]:
    out = [n for label in report["feature_spaces"].values() for n in label.get("notes", [])]
    dims = [(name, label["dim"]) for name, label in report["feature_spaces"].items() if "dim" in label]
    n = report.get("num_real") or 0
    out += [f"{n} real images < {dim} feature dimensions in {name}: the covariance is rank-deficient and the "
            "Fréchet distance is biased upward; compare only runs with the same number of images"
            for name, dim in dims if 0 < n < dim]  # fmt: skip
    return out


def main(args: list[str] | None = None) -> None:
    evaluate(parse_config(EvaluateConfig, PRESETS, args=args))


if __name__ == "__main__":
    main()
