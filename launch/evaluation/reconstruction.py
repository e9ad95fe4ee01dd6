"""Stage-1 evaluation: reconstruct a validation split and compare each image with its reconstruction.

PSNR and SSIM per image (autoencoder.metrics), LPIPS when its VGG weights are on this machine, and
rFID / rKID: the Fréchet (kernel) distance between the set of inputs and the set of their
reconstructions, in every feature space that could be built. Reconstructions use the posterior
mode, so the numbers do not depend on a sampling seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autoencoder import load_autoencoder, reconstruction_metrics
from autoencoder.perceptual import PerceptualLoss, PerceptualWeightsMissing, build_perceptual_loss
from data import DataConfig, iterate_once
from launch.evaluation.features import FeatureSpace, cat_rows, encode_all, to_uint8
from launch.evaluation.distances import compare_sets, gather_rows, share, skipped
from launch.evaluation.pictures import reconstruction_grid

GRID_IMAGES = 8


def load_lpips(weights: str, device) -> tuple[PerceptualLoss | None, dict[str, Any] | None]:
    """(LPIPS-VGG, None) or (None, {"skipped": reason})."""
    if weights.strip().lower() in ("", "none", "off"):
        return None, skipped("turned off (--lpips-weights none)")
    if weights != "auto" and not Path(weights).is_file():
        raise FileNotFoundError(f"--lpips-weights {weights}: no such file")
    try:
        return build_perceptual_loss("vgg", "imagenet", None if weights == "auto" else weights).to(device), None
    except PerceptualWeightsMissing as e:
        return None, skipped(str(e))


class _Accumulator:
    """This rank's per-image metrics and features of inputs and reconstructions."""

    def __init__(self, spaces: dict[str, FeatureSpace]) -> None:
        self.spaces = spaces
        self.per_image: dict[str, list[torch.Tensor]] = {}
        self.real: dict[str, list[torch.Tensor]] = {name: [] for name in spaces}
        self.fake: dict[str, list[torch.Tensor]] = {name: [] for name in spaces}
        self.shown: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, x: torch.Tensor, recon: torch.Tensor, perceptual: PerceptualLoss | None) -> None:
        for key, values in reconstruction_metrics(recon, x, perceptual).items():
            self.per_image.setdefault(key, []).append(values.float().cpu())
        for store, images in ((self.real, x), (self.fake, recon)):
            for name, feats in encode_all(self.spaces, to_uint8(images)).items():
                store[name].append(feats)
        room = GRID_IMAGES - sum(len(inputs) for inputs, _ in self.shown)
        if room > 0:
            self.shown.append((x[:room].cpu(), recon[:room].cpu()))

    def gathered(self, acc, metric_names: list[str]):
        per_image = {k: gather_rows(acc, torch.cat(self.per_image.get(k, [torch.empty(0)]))).cpu()
                     for k in metric_names}  # fmt: skip
        real = {n: gather_rows(acc, cat_rows(p, self.spaces[n].dim)).cpu() for n, p in self.real.items()}
        fake = {n: gather_rows(acc, cat_rows(p, self.spaces[n].dim)).cpu() for n, p in self.fake.items()}
        return per_image, real, fake


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(x).latent_dist.mode()).sample


def evaluate_autoencoder(cfg: Any, acc, spaces: dict[str, FeatureSpace], labels: dict[str, Any]) -> dict[str, Any]:
    """``cfg``: launch.evaluate.EvaluateConfig with --autoencoder and --data."""
    vae, contract = load_autoencoder(cfg.autoencoder)
    vae = vae.to(acc.device)
    size = cfg.resolution or contract.autoencoder_config.sample_size
    perceptual, lpips_skip = load_lpips(cfg.lpips_weights, acc.device)
    start, stop = share(cfg.num_images, acc.process_index, acc.num_processes)
    data = DataConfig(source=cfg.data, resolution=size, crop="center", missing_caption="empty")
    acc_rank, seen = _Accumulator(spaces), 0
    for batch in iterate_once(data, batch_size=cfg.batch_size, rank=acc.process_index, world_size=acc.num_processes):
        x = batch["pixel_values"][: stop - start - seen].to(acc.device)
        acc_rank.add(x, reconstruct(vae, x), perceptual)
        seen += len(x)
        if seen >= stop - start:
            break
    names = ["psnr", "ssim"] + (["lpips"] if perceptual is not None else [])
    per_image, real, fake = acc_rank.gathered(acc, names)
    if not acc.is_main_process:
        return {}  # the main process computes the metrics on the gathered values
    distances = compare_sets(real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    row: dict[str, Any] = {"num_images": len(per_image["psnr"]), **distances}
    for key in names:
        row[key] = _mean(per_image[key])
    row["lpips"] = row.get("lpips", lpips_skip)
    if acc_rank.shown:
        inputs, recons = (torch.cat(t) for t in zip(*acc_rank.shown))
        row["grid"] = "reconstructions.png"
        reconstruction_grid(inputs, recons).save(Path(cfg.out) / row["grid"])
    return {
        "task": "autoencoder", "autoencoder": str(cfg.autoencoder), "weights_sha256": contract.weights_sha256,
        "data": cfg.data, "image_size": size, "num_images": cfg.num_images, "num_real": row["num_images"],
        "num_processes": acc.num_processes, "reconstruction": "decode(posterior mode), compared in [-1, 1]",
        "fid_is": "rFID: Fréchet distance between the inputs and their reconstructions",
        "feature_spaces": labels, "lpips": lpips_skip or {"model": "LPIPS-VGG (lpips 0.1 linear layers)"},
        "results": [row],
    }  # fmt: skip


def _mean(values: torch.Tensor) -> float | dict[str, str]:
    """Mean over images; PSNR of an exact reconstruction is +inf, reported as such (JSON: Infinity)."""
    if not len(values):
        return skipped("no images")
    return float(values.double().mean())
