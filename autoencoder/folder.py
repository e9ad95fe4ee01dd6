"""The stage-1 output folder: a diffusers ``AutoencoderKL`` folder plus ``latent_contract.json``.

    out_dir/
      config.json                             diffusers config (scaling_factor 1.0 once folded)
      diffusion_pytorch_model.safetensors     weights (safetensors only)
      latent_contract.json                    LatentContract, incl. the sha256 of every weights file

The folder is written under a temporary name, fsynced, and renamed into place, so a reader never
sees a half-written folder under the final name. ``latent_contract.json`` is written last.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffusers import AutoencoderKL
from foundation import atomic_folder, sha256_file

from autoencoder.latents import LatentContract
from autoencoder.model import check_config_matches
from autoencoder.provenance import contract_from_json_dict

CONTRACT_FILE = "latent_contract.json"
CONFIG_FILE = "config.json"


def _write_folder(vae: AutoencoderKL, contract: LatentContract, tmp: Path) -> LatentContract:
    vae.save_pretrained(tmp, safe_serialization=True)
    weights = sorted(p for p in tmp.iterdir() if p.suffix == ".safetensors")
    if not weights:
        raise RuntimeError(f"save_pretrained wrote no .safetensors file into {tmp}")
    contract = dataclasses.replace(contract, weights_sha256={p.name: sha256_file(p) for p in weights})
    (tmp / CONTRACT_FILE).write_text(json.dumps(contract.to_json_dict(), indent=2) + "\n", encoding="utf-8")
    return contract


def save_autoencoder(
    vae: AutoencoderKL, contract: LatentContract, out_dir: str | Path, overwrite: bool = False
) -> LatentContract:
    """Write the stage-1 folder atomically; returns the contract with ``weights_sha256`` filled in.

    ``vae`` must be the unwrapped model (``accelerator.unwrap_model(model).vae``). An existing
    ``out_dir`` is replaced only with ``overwrite=True``.
    """
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"save_autoencoder needs the unwrapped AutoencoderKL, got {type(vae).__name__}")
    check_config_matches(vae, contract.autoencoder_config)
    if contract.folded and (vae.config.scaling_factor != 1.0 or vae.config.shift_factor is not None):
        raise ValueError("contract says folded, but the model's scaling_factor/shift_factor are not 1.0/None")
    with atomic_folder(Path(out_dir), overwrite=overwrite) as tmp:
        contract = _write_folder(vae, contract, tmp)
    return contract


def read_latent_contract(folder: str | Path) -> LatentContract:
    """The contract of a saved folder, after checking the folder is complete and unmodified."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no autoencoder folder at {folder}; train stage 1 (launch/train_vae.py) first")
    if (folder / CONFIG_FILE).is_file() and not (folder / CONTRACT_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} is not a stage-1 folder: {CONTRACT_FILE} is missing. A stock AutoencoderKL folder (or an "
            f"interrupted save) carries no latent statistics for your data; import it first with "
            f"python launch/import_vae.py --source {folder} --data YOUR_DATA --run.output-dir OUT, then use OUT/model"
        )
    for name in (CONFIG_FILE, CONTRACT_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} is not a complete autoencoder folder: {name} is missing (interrupted save, or not "
                "a folder written by save_autoencoder)"
            )
    try:
        contract = contract_from_json_dict(json.loads((folder / CONTRACT_FILE).read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / CONTRACT_FILE} is not a valid latent contract: {e}") from e
    if not contract.weights_sha256:
        raise ValueError(f"{folder / CONTRACT_FILE} lists no weights files")
    for name, expected in contract.weights_sha256.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the autoencoder folder is incomplete")
        if sha256_file(path) != expected:
            raise ValueError(f"{path} does not match the sha256 in {CONTRACT_FILE}: the weights were changed or corrupted")
    return contract


def load_autoencoder(folder: str | Path) -> tuple[AutoencoderKL, LatentContract]:
    """Load a folder written by ``save_autoencoder``: verified weights, the model, and its contract."""
    contract = read_latent_contract(folder)
    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    check_config_matches(vae, contract.autoencoder_config)
    if contract.folded and (vae.config.scaling_factor != 1.0 or vae.config.shift_factor is not None):
        raise ValueError(f"{folder}: contract says folded but config.json has scaling_factor/shift_factor set")
    return vae.eval(), contract
