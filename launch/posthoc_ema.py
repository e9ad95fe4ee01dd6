"""Post-hoc EMA (EDM2): rebuild an EMA of any length from a stage-3 run's snapshots, as a pipeline.

    python launch/train_ldm.py ... --posthoc-ema.snapshot-every 100      # stores RUN/posthoc_ema/
    python launch/posthoc_ema.py --run runs/ldm --sigma-rel 0.08 --out runs/ldm/pipeline_ema0.080

The run keeps two power-function EMAs (``--posthoc-ema.sigma-rels``, default 0.05 and 0.10) and
stores both every N steps; any other EMA length ``sigma_rel`` (its width as a fraction of the
training time) is their least-squares combination (Karras et al. 2024, section 3). So a short run
does not have to guess the EMA decay before it starts: rebuild a few, benchmark them, keep the best.
The result is the same pipeline folder the run exports, with the rebuilt weights in its UNet.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python launch/posthoc_ema.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from autoencoder.folder import load_autoencoder
from launch.training.ema import Reconstruction, gamma_of, reconstruct
from launch.training.ldm_stage import compose_pipeline
from ldm.cli import merge_into, parse_config, to_dict
from ldm.objective import DiffusionObjective
from ldm.unet import build_unet
from text_encoder import load_text_encoder

SNAPSHOT_FOLDER = "posthoc_ema"


@dataclass
class PostHocEMACommand:
    """Rebuild an EMA of length sigma_rel from a stage-3 run's post-hoc EMA snapshots."""

    run: Path = Path("runs/ldm")
    """The train_ldm output folder (holds config.json and posthoc_ema/snapshot_*.safetensors)."""
    sigma_rel: float = 0.10
    """EMA length as a fraction of the training time at the target step (EDM2's sigma_rel)."""
    step: int = 0
    """Rebuild the EMA as it would have been at this snapshot's step; 0: the newest snapshot."""
    out: Path | None = None
    """The pipeline folder to write; default RUN/pipeline_emaSIGMA (e.g. runs/ldm/pipeline_ema0.080)."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        gamma_of(self.sigma_rel)  # an impossible width is refused at parse time, with the valid range
        if self.step < 0:
            raise ValueError(f"step must be >= 0 (0: the newest snapshot), got {self.step}")


def training_config(run: Path):
    """The run's fully resolved TrainLDMConfig, read back from its config.json."""
    from launch.train_ldm import TrainLDMConfig

    path = run / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --run must be a train_ldm output folder")
    return merge_into(TrainLDMConfig(), json.loads(path.read_text(encoding="utf-8")), where=str(path))


def rebuilt_unet(cfg, rec: Reconstruction, text_width: int, latent_channels: int) -> torch.nn.Module:
    """The run's UNet architecture holding the rebuilt weights; every parameter must be covered."""
    torch.manual_seed(0)  # every parameter is overwritten below; this only keeps diffusers' init quiet and fixed
    unet = build_unet(cfg.unet, text_width, latent_channels)
    params = dict(unet.named_parameters())
    missing, unknown = sorted(set(params) - set(rec.weights)), sorted(set(rec.weights) - set(params))
    if missing or unknown:
        raise ValueError(f"the snapshots do not match the run's UNet: {len(missing)} parameter(s) not tracked "
                         f"(e.g. {missing[:3]}), {len(unknown)} unknown (e.g. {unknown[:3]}); were they written by "
                         "this run with its config.json?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(rec.weights[name].to(p.dtype))
    return unet.eval()


def posthoc_ema(cmd: PostHocEMACommand) -> Path:
    cfg = training_config(cmd.run)
    rec = reconstruct(cmd.run / SNAPSHOT_FOLDER, cmd.sigma_rel, cmd.step)
    out = cmd.out or cmd.run / f"pipeline_ema{cmd.sigma_rel:.3f}"
    if out.exists() and not cmd.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    print(f"sigma_rel {cmd.sigma_rel:g} at step {rec.step} ({rec.updates} EMA updates) from {rec.snapshots} "
          f"snapshot(s); profile fit error {100 * rec.fit_error:.2f}%")
    vae, contract = load_autoencoder(cfg.vae)
    text_encoder = load_text_encoder(cfg.text_encoder, device="cpu")
    unet = rebuilt_unet(cfg, rec, text_encoder.hidden_size, contract.latent_channels)
    pipe = compose_pipeline(cfg, unet, vae, text_encoder, DiffusionObjective(cfg.diffusion))
    pipe.training_config = {**to_dict(cfg), "posthoc_ema": {
        "sigma_rel": cmd.sigma_rel, "step": rec.step, "updates": rec.updates, "snapshots": rec.snapshots,
        "fit_error": rec.fit_error}}
    manifest_id = pipe.save_pretrained(out, overwrite=cmd.overwrite)
    print(f"saved {out} (manifest {manifest_id[:12]})")
    return out


def main(args: list[str] | None = None) -> None:
    posthoc_ema(parse_config(PostHocEMACommand, args=args))


if __name__ == "__main__":
    main()
