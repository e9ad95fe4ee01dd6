"""Stage 1 from an autoencoder someone else trained: import it, measure its latents on your data.

    python launch/import_vae.py --source hf:stabilityai/sd-vae-ft-mse --data data/mine \
        --val-data data/mine_val --data.resolution 256 --run.output-dir runs/vae_sd
    accelerate launch launch/import_vae.py --source SRC ...     # spreads the statistics pass over processes

SRC is an ``AutoencoderKL`` folder, a pipeline folder (its ``vae/``), ``hf:ORG/NAME``,
``hf:ORG/NAME/vae`` or one ``.safetensors`` file (``--source-config`` names its config.json). The
per-channel latent statistics are measured on ``--data`` over all processes and folded into the
weights exactly as ``train_vae.py`` does, so ``OUTPUT/model`` is a stage-1 folder that
``train_ldm.py --vae OUTPUT/model`` uses unchanged. ``latent_contract.json`` records the source (its
spec, weights sha256 and its own ``scaling_factor``/``shift_factor``). With ``--val-data`` the
reconstruction PSNR/SSIM on your held-out images is reported, computed as stage 1's validation does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # `python launch/import_vae.py` / `accelerate launch launch/import_vae.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from autoencoder import TrainableAutoencoder
from autoencoder.folder import read_latent_contract, save_autoencoder
from autoencoder.latents import LatentStatistics, fold_latent_statistics
from autoencoder.pretrained import (
    AutoencoderSourceError,
    autoencoder_config_of,
    load_pretrained_autoencoder,
    make_foldable,
    source_normalisation,
)
from autoencoder.provenance import ImportedLatentContract
from data import DataConfig
from launch.training.accelerator import setup_accelerator
from launch.training.config import RunConfig
from launch.training.vae_stage import Validator, measure_latent_statistics
from ldm.cli import parse_config, save_config

REPORT_FILE = "import_report.json"


@dataclass
class ImportVAEConfig:
    """Import a pretrained AutoencoderKL as stage 1: latent statistics measured on your data, folded in."""

    source: str = ""
    """SRC: an AutoencoderKL folder, a pipeline folder (its vae/), hf:ORG/NAME, hf:ORG/NAME/vae (?revision=COMMIT), or FILE.safetensors."""
    source_config: Path | None = None
    """The diffusers config.json (or its folder) of a single .safetensors source; default: FILE.json or config.json beside it."""
    data: DataConfig = field(default_factory=lambda: DataConfig(resolution=256, missing_caption="empty"))
    """The images the latent statistics are measured on (--data SPEC is short for --data.source SPEC)."""
    val_data: str = ""
    """--data spec of held-out images for reconstruction PSNR/SSIM; empty: none."""
    val_samples: int = 256
    """Held-out images scored (stage 1 validates on the same number by default)."""
    stats_samples: int = 4096
    """Images used to measure the per-channel latent statistics (0: all)."""
    normalization: Literal["measured", "source"] = "measured"
    """measured: per-channel mean/std of your data's latents (what train_vae.py folds). source: the source's own scaling_factor/shift_factor, so a UNet trained on the source's latents (a stock SD pipeline's) sees exactly those latents."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir=Path("runs/vae"), report_to="none"))
    """Output folder (the model goes to OUTPUT/model), seed, batch sizes and device options."""


def _contract(vae, source: dict[str, Any], stats: LatentStatistics, normalization: str) -> ImportedLatentContract:
    """Fold the chosen statistics into ``vae`` (in place); the contract records both kinds."""
    cfg = autoencoder_config_of(vae)
    c = cfg.latent_channels
    measured_mean, measured_std = stats.mean().tolist(), stats.std().tolist()
    record = {**source, "normalization": normalization,
              "measured_latent_mean": measured_mean, "measured_latent_std": measured_std}
    if source.get("scaling_factor"):
        # What the source's own normalisation makes of this data: 1.0 would be a perfect fit.
        _, source_std = source_normalisation(source, c)
        record["measured_std_after_source_normalisation"] = [m / s for m, s in zip(measured_std, source_std)]
    folded_stats = stats
    if normalization == "source":
        mean, std = source_normalisation(source, c)
        n = stats.count
        m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        folded_stats = LatentStatistics.from_tensor(torch.stack([torch.full_like(m, n), n * m, n * (s.square() + m.square())]))
    base = fold_latent_statistics(vae, folded_stats, cfg)
    return ImportedLatentContract(
        latent_mean=base.latent_mean, latent_std=base.latent_std, folded=True, autoencoder_config=cfg,
        num_values=stats.count, statistics_of="posterior_samples" if normalization == "measured" else "source_config",
        source=record,
    )


def _already_imported(model_dir: Path, source: dict[str, Any], cfg: ImportVAEConfig) -> bool:
    """A complete earlier import of the same weights with the same normalization: nothing to do."""
    if not (model_dir / "latent_contract.json").is_file():
        return False
    contract = read_latent_contract(model_dir)
    previous = getattr(contract, "source", {})
    if previous.get("weights_sha256") == source["weights_sha256"] and previous.get("normalization") == cfg.normalization:
        return True
    raise SystemExit(
        f"{model_dir} already holds another autoencoder (from {previous.get('spec', 'train_vae.py')}, normalization "
        f"{previous.get('normalization', 'measured')}); choose another --run.output-dir or delete it"
    )


def import_autoencoder(cfg: ImportVAEConfig) -> Path:
    if not cfg.source:
        raise SystemExit("--source SRC is required (an AutoencoderKL folder, a pipeline folder, hf:ORG/NAME, or FILE.safetensors)")
    acc = setup_accelerator(cfg.run)
    out = Path(cfg.run.output_dir)
    model_dir = out / "model"
    try:
        with acc.main_process_first():  # one process fills the Hub cache, the others then read it
            vae, source = load_pretrained_autoencoder(cfg.source, cfg.source_config)
    except AutoencoderSourceError as e:
        raise SystemExit(f"import_vae: {e}") from None
    if _already_imported(model_dir, source, cfg):
        acc.print(f"{model_dir} already holds this import ({cfg.source}); nothing to do.")
        acc.end_training()
        return model_dir
    if acc.is_main_process:
        save_config(cfg, out / "config.json")
    added = make_foldable(vae)
    source["added_identity_quant_convs"] = added
    vae = vae.to(acc.device).eval().requires_grad_(False)

    stats = measure_latent_statistics(cfg.data, acc, vae, cfg.stats_samples, cfg.run.eval_batch_size)
    acc.print(f"latent statistics over {stats.count} values per channel on {acc.num_processes} process(es): "
              f"mean {[round(v, 4) for v in stats.mean().tolist()]}, std {[round(v, 4) for v in stats.std().tolist()]}")
    report: dict[str, Any] = {"source": cfg.source, "num_processes": acc.num_processes, "num_values": stats.count,
                              "normalization": cfg.normalization}
    if acc.is_main_process:
        contract = _contract(vae, source, stats, cfg.normalization)
        save_autoencoder(vae, contract, model_dir, overwrite=True)
        ratio = contract.source.get("measured_std_after_source_normalisation")
        if ratio is not None:
            acc.print(f"the source's own scaling (scaling_factor {source['scaling_factor']}, shift_factor "
                      f"{source['shift_factor']}) would give latent std {[round(v, 3) for v in ratio]} on this data")
        acc.print(f"saved {model_dir} ({cfg.normalization} statistics folded in)")
        report["latent_mean"], report["latent_std"] = list(contract.latent_mean), list(contract.latent_std)
    acc.wait_for_everyone()
    if cfg.val_data:
        scores = _validate(cfg, acc, model_dir, out)
        report.update(scores)
        if scores:
            acc.print("reconstruction on --val-data: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    if acc.is_main_process:
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    acc.end_training()
    return model_dir


def _validate(cfg: ImportVAEConfig, acc, model_dir: Path, out: Path) -> dict[str, float]:
    """Stage 1's own validation (posterior mode, clamped, mean PSNR/SSIM) on the saved folder."""
    from autoencoder.folder import load_autoencoder

    validator = Validator(cfg, acc, out)
    vae, _ = load_autoencoder(model_dir)
    return validator.run(TrainableAutoencoder(vae.to(acc.device)), None, 0)


def main(args: list[str] | None = None) -> None:
    import_autoencoder(parse_config(ImportVAEConfig, args=args))


if __name__ == "__main__":
    main()
