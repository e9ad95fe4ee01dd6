"""Tiny randomly initialised models in exactly the layouts people download: a stock ``AutoencoderKL``
folder (SD's ``scaling_factor`` 0.18215), a 16-channel one with ``shift_factor`` and no quant convs
(FLUX/SD3), and a ``StableDiffusionPipeline`` folder written by diffusers itself with a CLIP text
encoder. Used by the import, init-from and LoRA tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tiny import WIDTH, tiny_clip_dir
from transformers import CLIPTextModel, CLIPTokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def stock_vae(latent_channels: int = 4, seed: int = 0, **config) -> AutoencoderKL:
    """f2, two blocks; defaults as SD's VAE (scaling_factor 0.18215, quant convs)."""
    torch.manual_seed(seed)
    kw = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=latent_channels,
              norm_num_groups=4, sample_size=32, scaling_factor=0.18215)
    kw.update(config)
    return AutoencoderKL(**kw).eval()


def sd_vae_dir(root: Path) -> Path:
    stock_vae().save_pretrained(root / "sd_vae")
    return root / "sd_vae"


def flux_vae_dir(root: Path) -> Path:
    """16 latent channels, shift_factor set, no quant_conv/post_quant_conv (FLUX.1's layout)."""
    vae = stock_vae(16, seed=1, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False)
    vae.save_pretrained(root / "flux_vae")
    return root / "flux_vae"


def stock_unet(cross_attention_dim: int = WIDTH, latent_channels: int = 4, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=2, norm_num_groups=8,
    ).eval()


def sd_pipeline_dir(root: Path) -> Path:
    """A StableDiffusionPipeline saved by diffusers' own save_pretrained (no ldm_manifest.json)."""
    clip = tiny_clip_dir(root / "clip_src")
    pipe = StableDiffusionPipeline(
        vae=stock_vae(), text_encoder=CLIPTextModel.from_pretrained(clip), tokenizer=CLIPTokenizer.from_pretrained(clip),
        unet=stock_unet(), scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd_pipe", safe_serialization=True)
    return root / "sd_pipe"


def hub_cache(root: Path, repo_id: str, folder: Path, subfolder: str = "") -> Path:
    """A Hugging Face cache (HF_HUB_CACHE) holding ``folder`` as ``repo_id`` at COMMIT, as a download leaves it."""
    cache = root / "hf_cache"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    dest = repo / "snapshots" / COMMIT / subfolder
    shutil.copytree(folder, dest, dirs_exist_ok=True)
    return cache


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """Point huggingface_hub at ``cache``, offline (it reads both settings at import, not from the env)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
