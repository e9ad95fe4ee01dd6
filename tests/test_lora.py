"""ldm/lora.py: adapters on the attention projections, exported so stock diffusers loads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny import tiny_pipeline

from ldm.lora import LORA_WEIGHTS, LoRAConfig, add_lora, load_lora, lora_state_dict, merged_unet, save_lora
from ldm.pipeline import LatentDiffusionPipeline

PROMPTS = ["red flag", "a face"]
# alpha != rank: the scale alpha / r = 2 must travel with the file for stock diffusers to match.
TRAINED = LoRAConfig(rank=4, alpha=8.0)


def max_diff(a: list, b: list) -> float:
    return max(float(np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)).max()) for x, y in zip(a, b))


def _train_a_little(unet) -> None:
    """Stand-in for training: give every B matrix values (B starts at 0, so the adapter is a no-op)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Our pipeline folder, and an adapter trained on it and exported."""
    root = tmp_path_factory.mktemp("lora")
    tiny_pipeline(root).save_pretrained(root / "pipe")
    pipe = LatentDiffusionPipeline.from_pretrained(root / "pipe")
    add_lora(pipe.unet, TRAINED)
    _train_a_little(pipe.unet)
    save_lora(pipe.unet, root / "adapter", base={"manifest_id": pipe.manifest_id})
    return root


def test_adapters_go_on_attention_projections_only_and_start_as_a_no_op(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    unet = pipe.unet
    x, t, hidden = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 12, 32)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=hidden).sample
    total = sum(p.numel() for p in unet.parameters())
    trainable = add_lora(unet, LoRAConfig(rank=2))
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and any(f".{m}." in n for m in ("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    # Each adapted Linear(in, out) adds r * (in + out) parameters.
    linears = [m for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert trainable == sum(2 * (m.in_features + m.out_features) for m in linears) < total
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=hidden).sample, before)
    with pytest.raises(ValueError, match="matched no module"):
        add_lora(tiny_pipeline(tmp_path / "b").unet, LoRAConfig(rank=2, target_modules=("no_such_layer",)))


def test_stock_diffusers_loads_the_adapter_and_gives_the_same_images(saved):
    ours = LatentDiffusionPipeline.from_pretrained(saved / "pipe")
    plain = ours(PROMPTS, steps=3, guidance_scale=3.0, seed=0)
    load_lora(ours.unet, saved / "adapter", scale=1.0)
    mine = ours(PROMPTS, steps=3, guidance_scale=3.0, seed=0)
    stock = StableDiffusionPipeline.from_pretrained(saved / "pipe")
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(saved / "adapter")
    gens = [torch.Generator().manual_seed(k) for k in range(2)]
    theirs = stock(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=3.0, generator=gens).images
    assert max_diff(mine, theirs) <= 1  # 8-bit images, same up to rounding
    assert max_diff(mine, plain) > 10  # the adapter changes the images: the comparison has power

    ours.unet.set_adapters(["lora"], weights=[0.5])
    half = ours(PROMPTS, steps=3, guidance_scale=3.0, seed=0)
    gens = [torch.Generator().manual_seed(k) for k in range(2)]
    theirs = stock(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=3.0, generator=gens,
                   cross_attention_kwargs={"scale": 0.5}).images
    assert max_diff(half, theirs) <= 1 and max_diff(half, mine) > 1


def test_merged_pipeline_equals_the_adapted_one(saved, tmp_path):
    ours = LatentDiffusionPipeline.from_pretrained(saved / "pipe")
    load_lora(ours.unet, saved / "adapter", scale=1.0)
    adapted = ours(PROMPTS, steps=3, guidance_scale=3.0, seed=0)
    merged = merged_unet(ours.unet)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ours.unet = merged
    ours.save_pretrained(tmp_path / "merged")
    reloaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert max_diff(reloaded(PROMPTS, steps=3, guidance_scale=3.0, seed=0), adapted) <= 1


def test_export_round_trips_and_a_changed_file_is_refused(saved, tmp_path):
    import json
    import shutil

    manifest = json.loads((saved / "adapter" / "lora_manifest.json").read_text())
    assert manifest["rank"] == 4 and manifest["alpha"] == 8.0 and manifest["base"]["manifest_id"]
    pipe = LatentDiffusionPipeline.from_pretrained(saved / "pipe")
    load_lora(pipe.unet, saved / "adapter")
    reference = LatentDiffusionPipeline.from_pretrained(saved / "pipe")
    add_lora(reference.unet, TRAINED)
    _train_a_little(reference.unet)
    ours, theirs = lora_state_dict(pipe.unet), lora_state_dict(reference.unet)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    broken = tmp_path / "broken"
    shutil.copytree(saved / "adapter", broken)
    data = bytearray((broken / LORA_WEIGHTS).read_bytes())
    data[-1] ^= 1
    (broken / LORA_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_lora(LatentDiffusionPipeline.from_pretrained(saved / "pipe").unet, broken)
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights"):
        load_lora(pipe.unet, tmp_path)


def test_ldm_generate_applies_lora_at_the_given_scale(saved, tmp_path, capsys):
    from PIL import Image

    from ldm.generate import main

    common = ["--model", str(saved / "pipe"), "--prompt", PROMPTS[0], "--steps", "3", "--guidance", "3.0",
              "--device", "cpu"]
    main([*common, "--lora", str(saved / "adapter"), "--lora-scale", "0.5", "--out", str(tmp_path / "half")])
    (path,) = sorted((tmp_path / "half").glob("*.png"))
    image = Image.open(path)
    assert image.text["lora_scale"] == "0.5" and image.text["lora"] == str(saved / "adapter")
    ours = LatentDiffusionPipeline.from_pretrained(saved / "pipe")
    load_lora(ours.unet, saved / "adapter", scale=0.5)
    assert max_diff([image.convert("RGB")], ours([PROMPTS[0]], steps=3, guidance_scale=3.0, seed=0)) == 0
    main([*common, "--out", str(tmp_path / "base")])
    (base,) = sorted((tmp_path / "base").glob("*.png"))
    assert max_diff([image.convert("RGB")], [Image.open(base).convert("RGB")]) > 1
    with pytest.raises(SystemExit):
        main([*common, "--lora", str(tmp_path), "--out", str(tmp_path / "bad")])
    assert "no pytorch_lora_weights.safetensors" in capsys.readouterr().err


def test_train_ldm_lora_from_a_stock_pipeline_loads_in_stock_diffusers(tmp_path, capsys):
    """Fine-tune a stock StableDiffusionPipeline folder with --lora-rank: base untouched, adapter exported."""
    import json

    from _pretrained_fixtures import sd_pipeline_dir
    from PIL import Image
    from tiny import make_captioned_folder
    from safetensors.torch import load_file

    from launch.import_vae import main as import_vae
    from launch.train_ldm import main as train_ldm
    from ldm.generate import main as generate

    src = sd_pipeline_dir(tmp_path)
    data = make_captioned_folder(tmp_path / "data", n=8, size=32)
    import_vae(["--source", str(src), "--normalization", "source", "--data", str(data), "--data.resolution", "32",
                "--run.output-dir", str(tmp_path / "vae"), "--run.num-workers", "0"])
    out = tmp_path / "run"
    train_ldm(["--preset", "tiny", "--data", str(data), "--vae", str(tmp_path / "vae" / "model"),
               "--text-encoder", f"hf:{src}", "--init-from", str(src), "--lora-rank", "4", "--lora-merge",
               "--lr", "0.05", "--run.max-steps", "4", "--sample-every", "1000", "--val-every", "1000",
               "--run.output-dir", str(out)])
    log = capsys.readouterr().out
    assert "LoRA rank 4:" in log and "warning" not in log  # same autoencoder, same normalisation, same text encoder

    base, theirs = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"), \
        load_file(src / "unet" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == theirs.keys() and all(torch.equal(base[k], theirs[k]) for k in base), "LoRA leaves the base as it was"
    adapter = load_file(out / "lora" / LORA_WEIGHTS)
    assert all(k.startswith("unet.") for k in adapter)
    up = [v for k, v in adapter.items() if k.endswith("lora.up.weight")]  # diffusers' name for B
    assert up and any(v.abs().max() > 0 for v in up), "training moved the adapters off zero"
    manifest = json.loads((out / "lora" / "lora_manifest.json").read_text())
    assert manifest["base"]["kind"] == "stock_pipeline" and manifest["base"]["pipeline_manifest_id"]

    generate(["--model", str(out / "pipeline"), "--lora", str(out / "lora"), "--prompt", PROMPTS[0], "--steps", "3",
              "--guidance", "3.0", "--out", str(tmp_path / "ours")])
    (png,) = (tmp_path / "ours").glob("*.png")
    stock = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(out / "lora")
    image = stock([PROMPTS[0]], height=32, width=32, num_inference_steps=3, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(0)]).images
    assert max_diff([Image.open(png).convert("RGB")], image) <= 1
    merged = LatentDiffusionPipeline.from_pretrained(out / "pipeline_merged")
    assert max_diff(merged([PROMPTS[0]], steps=3, guidance_scale=3.0, seed=0), image) <= 1


def test_resumed_lora_run_is_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    from _pretrained_fixtures import sd_pipeline_dir
    from tiny import make_captioned_folder
    from safetensors.torch import load_file

    from launch.import_vae import main as import_vae
    from launch.train_ldm import main as train_ldm

    src = sd_pipeline_dir(tmp_path)
    data = make_captioned_folder(tmp_path / "data", n=8, size=32)
    import_vae(["--source", str(src), "--normalization", "source", "--data", str(data), "--data.resolution", "32",
                "--run.output-dir", str(tmp_path / "vae"), "--run.num-workers", "0"])

    def lora_run(out, steps):
        train_ldm(["--preset", "tiny", "--data", str(data), "--vae", str(tmp_path / "vae" / "model"),
                   "--text-encoder", f"hf:{src}", "--init-from", str(src), "--lora-rank", "2", "--lr", "0.01",
                   "--run.max-steps", str(steps), "--run.checkpoint-every", "2", "--sample-every", "1000",
                   "--val-every", "1000", "--run.output-dir", str(out)])
        return load_file(out / "lora" / LORA_WEIGHTS)

    import json

    straight = lora_run(tmp_path / "straight", 4)
    lora_run(tmp_path / "split", 2)
    split = lora_run(tmp_path / "split", 4)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps.count(2) == 1, "the rerun resumed at step 2 (from the checkpoint with the adapters), not 0"
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)
