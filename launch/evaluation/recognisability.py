"""Does a pipeline draw what it is asked? The emoji classifier's verdict on generated images.

For a fixed set of prompts (training captions of base emoji, spread over every category), generate
one image per prompt and count how often the classifier names the prompt's subcategory and
category, against how often it does on the real images of the same prompts: the ratio is the score
(1 means as recognisable as the real thing). Beside it, the Frechet distance between real and
generated images in the classifier's pooled features (FID's recipe in a space that knows emoji).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from launch.evaluation.distances import frechet_distance
from launch.evaluation.emoji_classifier import EmojiClassifier, LabelledImages, load_classifier, load_labelled
from launch.evaluation.features import pil_to_uint8

SKIPPED_CATEGORIES = ("Component",)  # skin-tone swatches and hair parts: not things a user asks for


@dataclass
class PromptSet:
    """Benchmark prompts and the real image of each: uint8 images [N, 3, R, R]."""

    prompts: list[str]
    images: torch.Tensor
    subcategory: list[str]
    category: list[str]


def benchmark_prompts(data: LabelledImages, per_category: int = 12) -> PromptSet:
    """``per_category`` base emoji of every category, evenly spaced in emoji.json's sort order.

    Deterministic in the data alone, so every model is asked the same questions.
    """
    by_category: dict[str, list[int]] = {}
    for i, (cat, base) in enumerate(zip(data.category, data.base)):
        if base and cat not in SKIPPED_CATEGORIES:
            by_category.setdefault(cat, []).append(i)
    chosen: list[int] = []
    for cat in sorted(by_category):
        members = sorted(by_category[cat], key=lambda i: data.sort_order[i])
        n = min(per_category, len(members))
        chosen += [members[int((j + 0.5) * len(members) / n)] for j in range(n)]
    if not chosen:
        raise ValueError("no base emoji with a category to draw benchmark prompts from")
    return PromptSet([data.captions[i] for i in chosen], data.images[chosen],
                     [data.subcategory[i] for i in chosen], [data.category[i] for i in chosen])


def recognised(clf: EmojiClassifier, images: torch.Tensor, prompts: PromptSet, per_prompt: int = 1
               ) -> dict[str, Any]:
    """Accuracies on ``images`` [N * per_prompt, 3, H, W] uint8 (prompt-major) and their features."""
    pred = clf.predict(images)
    sub = clf.label_ids(prompts.subcategory, "subcategory").repeat_interleave(per_prompt)
    cat = clf.label_ids(prompts.category, "category").repeat_interleave(per_prompt)
    sub_ok = pred["subcategory"] == sub  # [N * per_prompt] bool
    categories = [c for c in prompts.category for _ in range(per_prompt)]
    per_category = {c: sub_ok[torch.tensor([x == c for x in categories])].float().mean().item()
                    for c in sorted(set(prompts.category))}
    return {"subcategory_acc": sub_ok.float().mean().item(),
            "category_acc": (pred["category"] == cat).float().mean().item(),
            "per_category_subcategory_acc": per_category,
            "features": pred["features"]}


def compare(real: dict[str, Any], generated: dict[str, Any]) -> dict[str, float]:
    """The benchmark's numbers for one set of generated images against the real images."""
    fd = frechet_distance(real["features"], generated["features"])
    out = {"subcategory_acc": generated["subcategory_acc"], "category_acc": generated["category_acc"],
           "fd": fd if isinstance(fd, float) else float("nan"),
           "per_category_subcategory_acc": generated["per_category_subcategory_acc"]}
    for kind in ("subcategory", "category"):
        out[f"{kind}_ratio"] = generated[f"{kind}_acc"] / max(real[f"{kind}_acc"], 1e-9)
    return out


@torch.no_grad()
def through_autoencoder(pipe, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """uint8 images [N, 3, H, W] encoded (posterior mean) and decoded by ``pipe``'s autoencoder, at its resolution."""
    side = pipe.unet.config.sample_size * pipe.factor
    out = []
    for chunk in images.split(batch_size):
        x = chunk.float().div(127.5).sub(1)
        if x.shape[-1] != side:
            x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        latents = pipe.vae.encode(x.to(pipe.device, pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
        out.append(pil_to_uint8(pipe.decode_latents(latents)))
    return torch.cat(out)


@torch.no_grad()
def score_pipeline(pipe, clf: EmojiClassifier, prompts: PromptSet, guidance_scales: tuple[float, ...], *,
                   steps: int = 20, sampler: str | None = None, seed: int = 0, per_prompt: int = 1,
                   batch_size: int = 32, autoencoder_row: bool = False, grid: Path | None = None) -> dict[str, Any]:
    """{"real": accuracies on the real images, "guidance": {scale: compare(...)}} for ``pipe``; with
    ``autoencoder_row`` also "autoencoder": the real images through the pipeline's autoencoder, the
    score a perfect stage 3 would reach with this stage 1.

    Image k of the set uses seed ``seed + k`` at every guidance scale, so scales differ only by guidance.
    ``grid``: also save each scale's images as a PNG beside it (``NAME_g4.png``: one row per prompt,
    the real image first, then the generated ones).
    """
    real = recognised(clf, prompts.images, prompts)
    out: dict[str, Any] = {"real": {k: v for k, v in real.items() if k != "features"},
                           "prompts": len(prompts.prompts), "images_per_prompt": per_prompt, "guidance": {}}
    if autoencoder_row:
        out["autoencoder"] = compare(real, recognised(clf, through_autoencoder(pipe, prompts.images, batch_size), prompts))
    for scale in guidance_scales:
        res = pipe.generate(prompts.prompts, num_images_per_prompt=per_prompt, steps=steps, sampler=sampler,
                            guidance_scale=scale, seed=seed, batch_size=batch_size)
        images = pil_to_uint8([r.image for r in res])
        generated = recognised(clf, images, prompts, per_prompt)
        out["guidance"][f"{scale:g}"] = compare(real, generated)
        if grid is not None:
            save_grid(grid.with_name(f"{grid.stem}_g{scale:g}.png"), prompts.images, images, per_prompt)
    return out


def save_grid(path: Path, real: torch.Tensor, generated: torch.Tensor, per_prompt: int, columns: int = 4) -> Path:
    """A PNG of ``columns`` prompts side by side per row: each the real image, then its generated ones.

    real: uint8 [N, 3, R, R]; generated: uint8 [N * per_prompt, 3, H, W] (prompt-major).
    """
    from PIL import Image

    side = generated.shape[-1]
    if real.shape[-1] != side:
        real = F.interpolate(real.float(), size=(side, side), mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
    n = real.shape[0]
    cells = torch.cat([real[:, None], generated.view(n, per_prompt, *generated.shape[1:])], dim=1)  # [N, 1+k, 3, H, W]
    rows = -(-n // columns)
    gap = max(2, side // 8)
    width = columns * ((1 + per_prompt) * side + gap)
    canvas = torch.full((3, rows * (side + 2), width), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        x0 = c * ((1 + per_prompt) * side + gap)
        strip = cells[i].permute(1, 2, 0, 3).reshape(3, side, (1 + per_prompt) * side)
        canvas[:, r * (side + 2): r * (side + 2) + side, x0: x0 + strip.shape[-1]] = strip
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(path)
    return path


@dataclass
class QualityCheck:
    """The benchmark as an in-training check (train_ldm --eval-every N --eval-classifier FILE): a few
    prompts per category at fixed seeds, scored every N steps so users see recognisability move."""

    classifier: EmojiClassifier
    prompts: PromptSet
    guidance: tuple[float, ...]
    steps: int

    @classmethod
    def load(cls, classifier: Path | None, data_source: str, per_category: int, guidance: tuple[float, ...],
             steps: int) -> QualityCheck:
        """The cached classifier file (benchmarks/demo_quality.py writes it) and prompts from the training data."""
        if classifier is None:
            raise ValueError("--eval-every needs --eval-classifier FILE (benchmarks/demo_quality.py trains and caches one)")
        clf = load_classifier(classifier)
        return cls(clf, benchmark_prompts(load_labelled(data_source, clf.cfg.resolution), per_category),
                   tuple(guidance), steps)

    def __call__(self, pipe) -> dict[str, float]:
        """{"quality_subcategory_ratio_g4": ..., "quality_category_ratio_g4": ..., "quality_fd_g4": ...}."""
        result = score_pipeline(pipe, self.classifier, self.prompts, self.guidance, steps=self.steps)
        return {f"quality_{name}_g{scale}": value for scale, r in result["guidance"].items()
                for name, value in r.items() if name in ("subcategory_ratio", "category_ratio", "fd")}


def quality_message(scores: dict[str, float]) -> str:
    """One line for the progress bar: subcategory ratio and FD per guidance scale."""
    scales = [k[len("quality_fd_g"):] for k in scores if k.startswith("quality_fd_g")]
    return "recognisability " + ", ".join(
        f"g={s}: ratio {scores[f'quality_subcategory_ratio_g{s}']:.3f} FD {scores[f'quality_fd_g{s}']:.1f}" for s in scales)
