"""The numbers: FID and KID (torchmetrics) on gathered features, and CLIP score.

Each process encodes its own share of the images; ``gather_rows`` collects the features of all
processes (in rank order) and the main process computes the metrics on the whole set with
torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``. The features are
computed before the metric sees them, so torchmetrics gets a pass-through feature module and its
own cross-process sync is switched off (the gather already happened; a sync on one rank only
would hang).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from launch.evaluation.features import OpenClip

MIN_IMAGES = 2
"""FID needs a covariance: at least two images on each side."""


def skipped(reason: str) -> dict[str, str]:
    """How the report writes a metric that was not computed."""
    return {"skipped": reason}


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous block [start, stop) of n items; blocks differ in size by at most one."""
    return rank * n // world, (rank + 1) * n // world


def gather_rows(acc, rows: torch.Tensor) -> torch.Tensor:
    """All processes' ``rows`` [n_rank, ...] concatenated in rank order; every rank must call it.

    Ranks may hold different numbers of rows (uneven shares), so rows are padded to the longest
    share for the collective and the padding is cut off again.
    """
    rows = rows.to(acc.device).contiguous()
    if acc.num_processes == 1:
        return rows
    counts = acc.gather(torch.tensor([rows.shape[0]], device=acc.device)).tolist()
    padded = acc.gather(acc.pad_across_processes(rows, dim=0))  # [world * max_n, ...]
    chunks = padded.split(max(counts), dim=0)
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, counts)], dim=0)


class PrecomputedFeatures(nn.Module):
    """torchmetrics' ``feature`` hook for features that were already computed: passes them through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float | dict[str, str]:
    """FID between feature sets real [N, D] and fake [M, D] (torchmetrics, float64 statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(real), len(fake)) < MIN_IMAGES:
        return skipped(f"needs at least {MIN_IMAGES} real and generated images, got {len(real)} and {len(fake)}")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real.cpu().double(), real=True)
    metric.update(fake.cpu().double(), real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int
) -> dict[str, Any]:
    """KID (Bińkowski et al. 2018) as {"mean", "std", "subset_size"} over random subsets.

    The subsets are drawn by torchmetrics from the global RNG; it is seeded here inside a forked
    RNG state, so the same features give the same KID and nothing outside is disturbed.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size < MIN_IMAGES:
        return skipped(f"needs at least {MIN_IMAGES} real and generated images, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(real.cpu().double(), real=True)
    metric.update(fake.cpu().double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subset_size": size}


def clip_scores(clip: OpenClip, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per-image CLIP score [B] = max(100 * cos(image embedding, prompt embedding), 0).

    Hessel et al. 2021 with w = 100, the convention of torchmetrics' CLIPScore and of the SD / Imagen
    FID-vs-CLIP plots.
    """
    image = torch.nn.functional.normalize(clip.image_embeddings(images), dim=-1)  # [B, D]
    text = torch.nn.functional.normalize(clip.text_embeddings(prompts), dim=-1)  # [B, D]
    return (100.0 * (image * text).sum(dim=-1)).clamp(min=0.0)


def compare_sets(
    real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor], kid_subsets: int, kid_subset_size: int, seed: int
) -> dict[str, dict[str, Any]]:
    """{"fid": {space: value}, "kid": {space: value}} for every feature space in both sets."""
    out: dict[str, dict[str, Any]] = {"fid": {}, "kid": {}}
    for name in fake:
        out["fid"][name] = frechet_distance(real[name], fake[name])
        out["kid"][name] = kernel_distance(real[name], fake[name], kid_subsets, kid_subset_size, seed)
    return out
