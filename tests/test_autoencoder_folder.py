"""autoencoder.folder: the saved stage-1 folder loads anywhere and refuses to load when damaged."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from tiny import flip_bits

from autoencoder import AUTOENCODER_PRESETS, TrainableAutoencoder, build_autoencoder
from autoencoder.folder import CONTRACT_FILE, load_autoencoder, read_latent_contract, save_autoencoder
from foundation import sha256_file
from autoencoder.latents import LatentStatistics, fold_latent_statistics

CFG = AUTOENCODER_PRESETS["tiny"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folded tiny autoencoder saved to a folder, its input, and its own reconstruction."""
    torch.manual_seed(0)
    vae = build_autoencoder(CFG).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    stats = LatentStatistics(CFG.latent_channels)
    with torch.no_grad():
        stats.update_from_posterior(vae.encode(x).latent_dist, torch.Generator().manual_seed(0))
        contract = fold_latent_statistics(vae, stats, CFG)
        recon = vae(x).sample
    out = tmp_path_factory.mktemp("stage1") / "model"
    contract = save_autoencoder(vae, contract, out)
    return out, x, recon, contract


def test_saved_folder_reproduces_our_reconstruction_in_stock_diffusers(saved):
    out, x, recon, contract = saved
    stock = AutoencoderKL.from_pretrained(out).eval()
    ours, loaded_contract = load_autoencoder(out)
    with torch.no_grad():
        assert torch.equal(stock(x).sample, recon)
        assert torch.equal(ours(x).sample, recon)
    assert loaded_contract == contract
    assert stock.config.scaling_factor == 1.0


def test_contract_file_carries_the_latent_contract(saved):
    out, _, _, contract = saved
    data = json.loads((out / CONTRACT_FILE).read_text())
    assert data["folded"] is True and data["downsample_factor"] == 2 and data["latent_channels"] == 4
    assert data["autoencoder_config"]["block_out_channels"] == list(CFG.block_out_channels)
    assert len(data["latent_mean"]) == len(data["latent_std"]) == 4
    (name, digest), = data["weights_sha256"].items()
    assert name.endswith(".safetensors") and sha256_file(out / name) == digest
    assert not list(out.glob("*.bin")) and not list(out.parent.glob(".model.tmp-*"))


def test_missing_and_incomplete_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no autoencoder folder"):
        load_autoencoder(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="latent_contract.json is missing"):
        load_autoencoder(tmp_path / "half")


def _copy(saved, tmp_path):
    import shutil

    shutil.copytree(saved[0], tmp_path / "copy")
    return tmp_path / "copy"


def test_a_flipped_byte_in_the_weights_is_caught(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    weights = next(folder.glob("*.safetensors"))
    flip_bits(weights, -5, 0x01)
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_autoencoder(folder)


def test_missing_weights_are_caught(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    next(folder.glob("*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_latent_contract(folder)


def test_save_refuses_to_clobber_and_replaces_with_overwrite(saved, tmp_path):
    out, x, recon, contract = saved
    vae, _ = load_autoencoder(out)
    target = tmp_path / "again"
    save_autoencoder(vae, contract, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_autoencoder(vae, contract, target)
    save_autoencoder(vae, contract, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    with torch.no_grad():
        assert torch.equal(load_autoencoder(target)[0](x).sample, recon)


def test_save_wants_the_unwrapped_model(saved, tmp_path):
    vae, contract = load_autoencoder(saved[0])
    with pytest.raises(TypeError, match="unwrapped"):
        save_autoencoder(TrainableAutoencoder(vae), contract, tmp_path / "x")
