"""launch/import_vae.py: stock autoencoders in every source form become stage-1 folders."""

from __future__ import annotations

import json

import pytest
import torch
from _pretrained_fixtures import COMMIT, flux_vae_dir, hub_cache, sd_pipeline_dir, sd_vae_dir, stock_vae, use_hub_cache
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from tiny import make_captioned_folder, run, tiny_pipeline, two_process_command

from autoencoder.folder import load_autoencoder
from autoencoder.metrics import psnr
from autoencoder.pretrained import AutoencoderSourceError, load_pretrained_autoencoder, resolve_autoencoder_source
from autoencoder.provenance import ImportedLatentContract


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_captioned_folder(tmp_path_factory.mktemp("import_data") / "images", n=16, size=32)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    return {"sd": sd_vae_dir(root), "flux": flux_vae_dir(root), "pipe": sd_pipeline_dir(root), "root": root}


def pixels(folder, n=16):
    from PIL import Image
    import numpy as np

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))[:n]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def import_args(source, data, out, *extra):
    return ["--source", str(source), "--data", str(data), "--data.resolution", "32", "--run.output-dir", str(out),
            "--run.num-workers", "0", "--stats-samples", "0", *extra]


def _same_weights(a: AutoencoderKL, b: AutoencoderKL) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_source_form_loads_the_same_weights(stock, tmp_path, monkeypatch):
    reference = AutoencoderKL.from_pretrained(stock["sd"])
    # A Hub repository holding a bare AutoencoderKL, and one holding a whole pipeline.
    cache = hub_cache(tmp_path, "org/sd-vae", stock["sd"])
    hub_cache(tmp_path, "org/sd-pipe", stock["pipe"])
    use_hub_cache(monkeypatch, cache)
    single = tmp_path / "vae.safetensors"
    save_file(reference.state_dict(), single)
    specs = {
        str(stock["sd"]): "autoencoder_folder", str(stock["pipe"]): "pipeline_folder", "hf:org/sd-vae": "hub",
        "hf:org/sd-pipe": "hub", "hf:org/sd-pipe/vae": "hub", f"hf:org/sd-vae?revision={COMMIT}": "hub",
    }
    pipe_vae = AutoencoderKL.from_pretrained(stock["pipe"] / "vae")
    for spec, kind in specs.items():
        vae, source = load_pretrained_autoencoder(spec)
        assert source["kind"] == kind and source["scaling_factor"] == pytest.approx(0.18215), spec
        assert _same_weights(vae, pipe_vae if "pipe" in spec else reference), spec
        if kind == "hub":
            assert source["revision"] == COMMIT and source["repo_id"] in ("org/sd-vae", "org/sd-pipe")
    vae, source = load_pretrained_autoencoder(str(single), config=stock["sd"] / "config.json")
    assert source["kind"] == "single_file" and _same_weights(vae, reference)
    (tmp_path / "vae.json").write_text((stock["sd"] / "config.json").read_text())  # config found beside the file
    assert _same_weights(load_pretrained_autoencoder(str(single))[0], reference)


def test_bad_sources_are_refused_with_what_to_do(stock, tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "empty_cache")
    with pytest.raises(AutoencoderSourceError, match="no such file"):
        resolve_autoencoder_source(str(tmp_path / "nope"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((stock["sd"] / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AutoencoderSourceError, match="pickle files are never loaded"):
        resolve_autoencoder_source(str(pickled))
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(AutoencoderSourceError, match="only .safetensors"):
        resolve_autoencoder_source(str(tmp_path / "model.ckpt"))
    lonely = tmp_path / "lonely" / "w.safetensors"
    lonely.parent.mkdir()
    save_file({"x": torch.zeros(1)}, lonely)
    with pytest.raises(AutoencoderSourceError, match="--source-config"):
        resolve_autoencoder_source(str(lonely))
    with pytest.raises(AutoencoderSourceError, match="does not fit its config.json"):
        load_pretrained_autoencoder(str(lonely), config=stock["sd"])
    with pytest.raises(AutoencoderSourceError, match="Hugging Face cache"):
        resolve_autoencoder_source("hf:org/not-cached")


def test_import_sd_layout_measures_folds_and_records_the_source(stock, images, tmp_path, capsys):
    from launch.import_vae import main

    out = tmp_path / "imported"
    main(import_args(stock["sd"], images, out, "--val-data", str(images), "--val-samples", "16"))
    vae, contract = load_autoencoder(out / "model")
    assert isinstance(contract, ImportedLatentContract) and contract.folded
    assert vae.config.scaling_factor == 1.0 and vae.config.shift_factor is None
    src = contract.source
    assert src["scaling_factor"] == pytest.approx(0.18215) and src["shift_factor"] is None
    assert src["normalization"] == "measured" and src["spec"] == str(stock["sd"])
    assert contract.num_values == 16 * 16 * 16  # every image: 16 x 16 latents per channel

    x = pixels(images)
    source = AutoencoderKL.from_pretrained(stock["sd"]).eval()
    with torch.no_grad():
        # Folding changes the latents' scale, never the reconstruction.
        ref = source.decode(source.encode(x).latent_dist.mode()).sample
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        assert torch.allclose(rec, ref, atol=1e-4)
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))  # [B, 4, 16, 16]
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.1 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1

    report = json.loads((out / "import_report.json").read_text())
    expected_psnr = psnr(rec.clamp(-1, 1), x).mean().item()
    assert report["psnr"] == pytest.approx(expected_psnr, abs=1e-3) and "ssim" in report
    assert "reconstruction on --val-data: psnr" in capsys.readouterr().out

    # Rerunning the same import does nothing; another source into the same folder is refused.
    before = (out / "model" / "latent_contract.json").read_text()
    main(import_args(stock["sd"], images, out))
    assert (out / "model" / "latent_contract.json").read_text() == before
    with pytest.raises(SystemExit, match="already holds another autoencoder"):
        main(import_args(stock["flux"], images, out))


def test_import_16_channel_with_shift_factor_and_no_quant_convs(stock, images, tmp_path):
    from launch.import_vae import main

    out = tmp_path / "flux"
    main(import_args(stock["flux"], images, out, "--normalization", "source"))
    vae = AutoencoderKL.from_pretrained(out / "model")  # stock diffusers rebuilds the added identity convs
    _, contract = load_autoencoder(out / "model")
    assert vae.config.latent_channels == 16 and vae.config.use_quant_conv and vae.config.shift_factor is None
    assert contract.source["added_identity_quant_convs"] and contract.source["shift_factor"] == pytest.approx(0.1159)
    assert contract.statistics_of == "source_config" and len(contract.source["measured_latent_std"]) == 16
    x = pixels(images, 4)
    source = AutoencoderKL.from_pretrained(stock["flux"]).eval()
    with torch.no_grad():
        z_src = source.encode(x).latent_dist.mode()
        z = vae.encode(x).latent_dist.mode()
        # "source" normalization reproduces what stock FLUX/SD3 pipelines feed their transformer.
        assert torch.allclose(z, (z_src - 0.1159) * 0.3611, atol=1e-5)
        assert torch.allclose(vae.decode(z).sample, source.decode(z_src).sample, atol=1e-4)


def test_any_autoencoderkl_shape_imports(images, tmp_path):
    from launch.import_vae import main

    odd = stock_vae(3, seed=2, block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, mid_block_add_attention=False)
    odd.save_pretrained(tmp_path / "odd")
    main(import_args(tmp_path / "odd", images, tmp_path / "out"))
    _, contract = load_autoencoder(tmp_path / "out" / "model")
    assert contract.latent_channels == 3 and contract.downsample_factor == 4
    assert contract.autoencoder_config.mid_block_add_attention is False


def test_imported_folder_composes_a_pipeline_that_stock_diffusers_loads(stock, images, tmp_path):
    """What train_ldm.py --vae OUT/model does with the folder: compose, save, load in stock diffusers."""
    from diffusers import StableDiffusionPipeline

    from ldm.pipeline import LatentDiffusionPipeline
    from launch.import_vae import main

    main(import_args(stock["sd"], images, tmp_path / "imported"))
    tiny_pipeline(tmp_path, vae=tmp_path / "imported" / "model").save_pretrained(tmp_path / "pipe")
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.manifest["autoencoder"]["latent_contract"]["source"]["scaling_factor"] == pytest.approx(0.18215)
    stock_pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    stock_pipe.set_progress_bar_config(disable=True)
    g = [torch.Generator().manual_seed(0)]
    theirs = stock_pipe(["red"], height=16, width=16, num_inference_steps=2, guidance_scale=3.0, generator=g,
                        output_type="np").images
    mine = loaded(["red"], steps=2, guidance_scale=3.0, seed=0, height=16, width=16)
    import numpy as np

    assert np.abs(np.asarray(mine[0], dtype=np.float64) / 255 - theirs[0]).max() < 2 / 255


@pytest.mark.slow
def test_two_processes_measure_over_all_ranks(stock, images, tmp_path):
    out = tmp_path / "ddp"
    proc = run(two_process_command("launch/import_vae.py", *import_args(stock["sd"], images, out)))
    report = json.loads((out / "import_report.json").read_text())
    assert report["num_processes"] == 2, "must really run two processes"
    # Each rank encodes its half; the reduced statistics count every image once.
    assert report["num_values"] == 16 * 16 * 16
    assert "2 process(es)" in proc.stdout + proc.stderr


# -- train_vae.py --init-from, end to end ---------------------------------------------------------


def _vae_args(src, data, out, *extra):
    return ["--preset", "tiny", "--data", str(data), "--init-from", str(src), "--run.output-dir", str(out),
            "--run.max-steps", "4", *extra]


def test_decoder_only_fine_tuning_keeps_the_latent_space(stock, images, tmp_path, capsys):
    from launch.import_vae import main as import_vae
    from launch.train_vae import main as train_vae

    import_vae(import_args(stock["sd"], images, tmp_path / "imported"))
    src = tmp_path / "imported" / "model"
    train_vae(_vae_args(src, images, tmp_path / "ft", "--decoder-only", "--lr", "0.01"))
    assert "autoencoder from --init-from" in capsys.readouterr().out
    before, src_contract = load_autoencoder(src)
    after, contract = load_autoencoder(tmp_path / "ft" / "model")
    a, b = before.state_dict(), after.state_dict()
    encoder = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(a[k], b[k]) for k in encoder), "the encoder must not change"
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder.")), "the decoder trained"
    assert contract.latent_mean == src_contract.latent_mean and contract.latent_std == src_contract.latent_std
    assert contract.source == src_contract.source  # provenance of the imported weights kept
    x = pixels(images, 4)
    with torch.no_grad():
        assert torch.equal(before.encode(x).latent_dist.mean, after.encode(x).latent_dist.mean)
    with pytest.raises(SystemExit, match="--decoder-only fine-tunes an existing autoencoder"):
        train_vae(["--preset", "tiny", "--data", str(images), "--decoder-only", "--run.output-dir", str(tmp_path / "x")])


def test_full_fine_tuning_from_a_stock_folder_resumes_and_refolds(stock, images, tmp_path, capsys):
    from launch.train_vae import main as train_vae

    train_vae(_vae_args(stock["flux"], images, tmp_path / "straight"))
    train_vae(_vae_args(stock["flux"], images, tmp_path / "split", "--run.max-steps", "2"))
    capsys.readouterr()
    train_vae(_vae_args(stock["flux"], images, tmp_path / "split"))
    assert "was not reapplied" in capsys.readouterr().out
    straight, contract = load_autoencoder(tmp_path / "straight" / "model")
    split, _ = load_autoencoder(tmp_path / "split" / "model")
    assert all(torch.equal(v, split.state_dict()[k]) for k, v in straight.state_dict().items())
    assert contract.latent_channels == 16 and straight.config.scaling_factor == 1.0
    source = AutoencoderKL.from_pretrained(stock["flux"])
    s = source.state_dict()
    assert any(not torch.equal(s[k], v) for k, v in straight.state_dict().items() if k.startswith("encoder."))


def _to_original_key_names(state: dict, n_blocks: int) -> dict:
    """diffusers AutoencoderKL keys -> the CompVis LDM names of a whole-model SD checkpoint (no mid attention)."""
    import re

    rules = [
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out["first_stage_model." + key.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def test_a_single_file_with_original_ldm_key_names_is_converted(tmp_path):
    vae = stock_vae(mid_block_add_attention=False, block_out_channels=(8, 16), layers_per_block=1)
    vae.save_pretrained(tmp_path / "ref")
    state = vae.state_dict()
    original = _to_original_key_names(state, 2)
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in original
    save_file(original, tmp_path / "sd_checkpoint.safetensors")
    loaded, source = load_pretrained_autoencoder(str(tmp_path / "sd_checkpoint.safetensors"), config=tmp_path / "ref")
    assert source["kind"] == "single_file" and _same_weights(loaded, vae)
