"""ldm/init_from.py: a UNet from our pipeline, a stock StableDiffusionPipeline or a unet/ folder, with checks."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from _pretrained_fixtures import hub_cache, sd_pipeline_dir, stock_unet, use_hub_cache
from text_encoder import FingerprintMismatch, load_text_encoder
from tiny import flip_bits, make_captioned_folder, tiny_autoencoder_dir, tiny_bert_dir, tiny_clip_dir, tiny_pipeline

from autoencoder.folder import read_latent_contract
from ldm.init_from import InitFromError, check_stages, load_unet, resolve_unet_source, unet_config_from
from ldm.manifest import PipelineMismatchError
from ldm.unet import UNET_PRESETS, unet_kwargs


@pytest.fixture(scope="module")
def ours(tiny_pipeline_root):
    """One of our pipeline folders (tiny, CLIP text encoder) and the stage folders it was built from."""
    return tiny_pipeline_root


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    return sd_pipeline_dir(tmp_path_factory.mktemp("stock"))


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_form_resolves_and_loads_the_source_unet(ours, stock, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    use_hub_cache(monkeypatch, hub_cache(tmp_path, "org/sd-pipe", stock))
    reference = UNet2DConditionModel.from_pretrained(stock / "unet")
    cases = {str(ours / "pipe"): "our_pipeline", str(stock): "stock_pipeline", str(stock / "unet"): "unet_folder",
             "hf:org/sd-pipe": "stock_pipeline"}
    for spec, kind in cases.items():
        source = resolve_unet_source(spec)
        assert source.kind == kind, spec
        unet = load_unet(source, cross_attention_dim=32, latent_channels=4)
        expected = UNet2DConditionModel.from_pretrained(ours / "pipe" / "unet") if "ours" in str(spec) else reference
        assert _same(unet, expected), spec
    record = resolve_unet_source(str(ours / "pipe")).record()
    assert record["manifest_id"] and record["kind"] == "our_pipeline" and record["unet_sha256"]
    assert resolve_unet_source("hf:org/sd-pipe").revision == "0123456789abcdef0123456789abcdef01234567"


def test_widths_that_do_not_fit_are_refused_naming_both_numbers(stock):
    source = resolve_unet_source(str(stock))
    with pytest.raises(InitFromError, match="width 32.*outputs width 48"):
        load_unet(source, cross_attention_dim=48, latent_channels=4)
    with pytest.raises(InitFromError, match="in_channels=4.*has 16 latent channels"):
        load_unet(source, cross_attention_dim=32, latent_channels=16)


def test_bad_sources_are_refused(ours, tmp_path):
    with pytest.raises(InitFromError, match="no such folder"):
        resolve_unet_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InitFromError, match="neither a pipeline folder"):
        resolve_unet_source(str(tmp_path / "empty"))
    changed = tmp_path / "changed"
    shutil.copytree(ours / "pipe", changed)
    weights = changed / "unet" / "diffusion_pytorch_model.safetensors"
    flip_bits(weights, -1, 1)
    with pytest.raises(PipelineMismatchError, match="unet/diffusion_pytorch_model.safetensors has changed"):
        resolve_unet_source(str(changed))
    pickled = tmp_path / "pickled"
    stock_unet().save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(InitFromError, match="pickle files are never loaded"):
        resolve_unet_source(str(pickled))


def test_our_manifest_checks_the_autoencoder_and_text_encoder(ours, tmp_path):
    source = resolve_unet_source(str(ours / "pipe"))
    clip = load_text_encoder(f"hf:{ours / 'clip'}")
    same = read_latent_contract(ours / "vae").to_json_dict()
    assert check_stages(source, same, clip) == []
    images = make_captioned_folder(tmp_path / "img", n=4, size=32)
    other = read_latent_contract(tiny_autoencoder_dir(tmp_path / "other_vae", images)).to_json_dict()
    with pytest.raises(InitFromError, match="another autoencoder's latents.*--allow-new-autoencoder"):
        check_stages(source, other, clip)
    (warning,) = check_stages(source, other, clip, allow_new_autoencoder=True)
    assert "allowed by --allow-new-autoencoder" in warning
    bert = load_text_encoder(f"hf:{tiny_bert_dir(tmp_path)}")
    with pytest.raises(FingerprintMismatch, match="init-from"):
        check_stages(source, same, bert)


def test_stock_pipeline_checks_what_it_can(stock, tmp_path):
    from launch.import_vae import main as import_vae

    images = make_captioned_folder(tmp_path / "img", n=8, size=32)
    common = ["--data", str(images), "--data.resolution", "32", "--run.num-workers", "0"]
    import_vae(["--source", str(stock), "--normalization", "source", "--run.output-dir", str(tmp_path / "a"), *common])
    import_vae(["--source", str(stock), "--run.output-dir", str(tmp_path / "b"), *common])
    source = resolve_unet_source(str(stock))
    clip = load_text_encoder(f"hf:{stock}")  # SRC's own text_encoder/ + tokenizer/
    kept = read_latent_contract(tmp_path / "a" / "model").to_json_dict()
    assert check_stages(source, kept, clip) == []
    (warning,) = check_stages(source, read_latent_contract(tmp_path / "b" / "model").to_json_dict(), clip)
    assert "--normalization source" in warning
    ours = tiny_pipeline(tmp_path / "ours")
    trained_here = read_latent_contract(ours.vae_dir).to_json_dict()
    with pytest.raises(InitFromError, match="trained here"):
        check_stages(source, trained_here, clip)
    with pytest.raises(FingerprintMismatch):
        check_stages(source, kept, load_text_encoder(f"hf:{tiny_bert_dir(tmp_path)}"))
    (warning,) = check_stages(resolve_unet_source(str(stock / "unet")), kept, clip)
    assert "cannot be checked" in warning


def test_unet_config_from_reads_back_what_we_build_and_refuses_what_we_cannot_express():
    for name in ("tiny", "small", "sd15"):
        config = {"_class_name": "UNet2DConditionModel", **unet_kwargs(UNET_PRESETS[name], 768, 4)}
        config = json.loads(json.dumps(config))  # tuples become lists, as in a config.json
        assert unet_config_from(config) == UNET_PRESETS[name], name
    pooled = dataclasses.replace(UNET_PRESETS["compact"], pooled_text=True)
    assert unet_config_from(json.loads(json.dumps(unet_kwargs(pooled, 384, 4)))) == pooled
    adagn = dataclasses.replace(UNET_PRESETS["mini"], scale_shift=True)
    assert unet_config_from(json.loads(json.dumps(unet_kwargs(adagn, 384, 4)))) == adagn
    sd2 = json.loads(json.dumps(unet_kwargs(UNET_PRESETS["sd15"], 1024, 4)))
    sd2["attention_head_dim"] = [5, 10, 20, 20]  # SD 2.x: heads per level
    assert unet_config_from(sd2) is None
    assert unet_config_from({**sd2, "attention_head_dim": 8, "upcast_attention": True}) is None


# -- train_ldm.py --init-from, end to end ---------------------------------------------------------


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _train_steps(out) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """import_vae (a stock SD-layout autoencoder) -> train_ldm at 32 px: the run later stages start from."""
    from _pretrained_fixtures import sd_vae_dir

    from launch.import_vae import main as import_vae
    from launch.train_ldm import main as train_ldm

    root = tmp_path_factory.mktemp("stages")
    data32 = make_captioned_folder(root / "d32", n=16, size=32)
    data64 = make_captioned_folder(root / "d64", n=16, size=64, seed=1)
    import_vae(["--source", str(sd_vae_dir(root)), "--data", str(data32), "--data.resolution", "32",
                "--run.output-dir", str(root / "vae"), "--run.num-workers", "0"])
    common = ["--preset", "tiny", "--vae", str(root / "vae" / "model"), "--text-encoder", f"hf:{tiny_clip_dir(root)}",
              "--sample-every", "1000", "--val-every", "1000"]
    train_ldm([*common, "--data", str(data32), "--run.output-dir", str(root / "s32"), "--run.max-steps", "4"])
    return {"root": root, "common": common, "data64": data64, "src": root / "s32" / "pipeline"}


def _continue(stage, out, *extra):
    from launch.train_ldm import main as train_ldm

    train_ldm([*stage["common"], "--data", str(stage["data64"]), "--data.resolution", "64", "--init-from",
               str(stage["src"]), "--run.output-dir", str(out), *extra])
    return out / "pipeline"


def test_continue_at_64_px_from_a_32_px_run(stage, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from ldm.generate import main as generate

    folder = _continue(stage, tmp_path / "s64", "--run.max-steps", "4")
    assert "UNet from --init-from" in capsys.readouterr().out
    assert _train_steps(tmp_path / "s64")[0] == 2, "a fresh --init-from run starts at step 0"
    manifest = json.loads((folder / "ldm_manifest.json").read_text())
    source = json.loads((stage["src"] / "ldm_manifest.json").read_text())
    assert manifest["training"]["init_from_source"]["manifest_id"] == source["manifest_id"]
    assert manifest["training"]["init_from"] == str(stage["src"])
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_config["sample_size"] == 32  # 64 px through the f2 autoencoder
    assert manifest["unet"]["config"] == {**source["unet"]["config"], "sample_size": 32}
    generate(["--model", str(folder), "--prompt", "a red disc", "--steps", "2", "--out", str(tmp_path / "img")])
    from PIL import Image

    (png,) = (tmp_path / "img").glob("*.png")
    assert Image.open(png).size == (64, 64)
    stock = StableDiffusionPipeline.from_pretrained(folder)
    assert stock.unet.config.sample_size * stock.vae_scale_factor == 64


def test_init_from_with_lr_0_reproduces_the_source_weights_exactly(stage, tmp_path):
    # train_ldm refuses --lr 0 at parse time; the first warmup step runs at exactly lr 0 instead
    # (a full optimizer step: AdamW update, weight decay, EMA update and export).
    folder = _continue(stage, tmp_path / "lr0", "--run.max-steps", "1", "--run.warmup-steps", "10")
    ours, theirs = _weights(folder), _weights(stage["src"])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    trained = _weights(_continue(stage, tmp_path / "lr", "--run.max-steps", "2", "--run.warmup-steps", "1"))
    assert any(not torch.equal(trained[k], theirs[k]) for k in theirs), "with a learning rate the weights move"


def test_resumed_init_from_run_is_bitwise_equal_to_an_uninterrupted_one(stage, tmp_path, capsys):
    straight = _weights(_continue(stage, tmp_path / "straight", "--run.max-steps", "6", "--run.checkpoint-every", "3"))
    _continue(stage, tmp_path / "split", "--run.max-steps", "3", "--run.checkpoint-every", "3")
    capsys.readouterr()
    split = _weights(_continue(stage, tmp_path / "split", "--run.max-steps", "6", "--run.checkpoint-every", "3"))
    assert "--init-from" in (out := capsys.readouterr().out) and "was not reapplied" in out
    assert _train_steps(tmp_path / "split").count(2) == 1, "the rerun resumed at step 3, not 0"
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)


def test_train_ldm_refuses_lora_without_init_from_and_a_mismatched_text_encoder(stage, tmp_path):
    from launch.train_ldm import main as train_ldm

    with pytest.raises(SystemExit, match="--lora-rank adapts existing weights"):
        train_ldm([*stage["common"], "--data", str(stage["data64"]), "--lora-rank", "2",
                   "--run.output-dir", str(tmp_path / "x")])
    common = [a if not a.startswith("hf:") else f"hf:{tiny_bert_dir(tmp_path)}" for a in stage["common"]]
    with pytest.raises(SystemExit, match="error: the text encoder does not match the one the UNet in --init-from"):
        train_ldm([*common, "--data", str(stage["data64"]), "--data.resolution", "64", "--init-from",
                   str(stage["src"]), "--run.output-dir", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="error: .*cross-attends to text of width 32, but this run's text encoder "
                                         "outputs width 384"):
        train_ldm([*[a if not a.startswith("hf:") else "minilm" for a in stage["common"]], "--data", str(stage["data64"]),
                   "--data.resolution", "64", "--init-from", str(stage["src"]), "--run.output-dir", str(tmp_path / "z")])


@pytest.mark.slow
def test_two_processes_init_from_lora_run(stage, tmp_path):
    """Every rank loads SRC and adds the same adapters; the ranks end with the same weights (checked
    by the run itself) and rank 0 exports the adapter."""
    from tiny import run, two_process_command

    out = tmp_path / "ddp"
    proc = run(two_process_command("launch/train_ldm.py", *stage["common"], "--data", stage["data64"],
                                   "--data.resolution", "64", "--init-from", stage["src"], "--lora-rank", "2",
                                   "--run.max-steps", "2", "--run.output-dir", out))
    state = json.loads(next((out / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["world_size"] == 2, "must really run two processes"
    assert "UNet from --init-from" in proc.stdout + proc.stderr
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
