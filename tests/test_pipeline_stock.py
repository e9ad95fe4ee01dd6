"""A saved pipeline loads in stock diffusers' StableDiffusionPipeline and gives the same images."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline
from tiny import tiny_pipeline

from ldm.objective import NoiseScheduleConfig
from ldm.pipeline import LatentDiffusionPipeline
from ldm.samplers import SAMPLERS, build_sampler

PROMPTS = ["red flag", "a face"]  # short: the tiny tokenizers' max_length is 12
CASES = {
    "clip-eps": ("clip", NoiseScheduleConfig()),
    "bert-v-zero-snr": ("bert", NoiseScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True)),
    "clip-flow-shift3": ("clip", NoiseScheduleConfig(prediction_type="flow_prediction", flow_shift=3.0)),
    # The UNet's own attention-pooled text summary (UNetConfig.pooled_text) needs nothing from the pipeline.
    "bert-flow-pooled-text": ("bert", NoiseScheduleConfig(prediction_type="flow_prediction"),
                              dict(pooled_text=True, pooled_text_heads=2)),
    # AdaGN (UNetConfig.scale_shift) is a stock UNet2DConditionModel option as well.
    "clip-flow-scale-shift": ("clip", NoiseScheduleConfig(prediction_type="flow_prediction"), dict(scale_shift=True)),
}


def psnr(a: list, b: list) -> float:
    """Worst per-image PSNR in dB between two lists of 8-bit PIL images."""
    x = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    y = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    return float((10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))).min())


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    encoder, schedule, *unet_fields = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tiny_pipeline(root, encoder=encoder, schedule=schedule, **(unet_fields[0] if unet_fields else {})).save_pretrained(root / "pipe")
    ours = LatentDiffusionPipeline.from_pretrained(root / "pipe")
    stock = StableDiffusionPipeline.from_pretrained(root / "pipe")
    stock.set_progress_bar_config(disable=True)
    return ours, stock, stock.scheduler


@pytest.fixture
def pipes(saved):
    """Both pipelines, stock's scheduler a fresh copy of the one saved in the folder."""
    ours, stock, scheduler = saved
    stock.scheduler = type(scheduler).from_config(scheduler.config)
    return ours, stock


def _stock(stock, seed, n, **kw):
    generators = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    return stock(PROMPTS, height=16, width=16, generator=generators, **kw).images


def test_stock_diffusers_loads_the_folder_as_saved(pipes):
    ours, stock = pipes
    assert type(stock.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert stock.scheduler.config.prediction_type == ours.schedule.prediction_type
    assert stock.safety_checker is None and stock.vae_scale_factor == ours.factor == 2
    assert type(stock.text_encoder) is type(ours.text_encoder.model)


def test_same_images_with_guidance_and_negative_prompt(pipes):
    ours, stock = pipes
    kw = dict(num_images_per_prompt=2, guidance_scale=7.5, guidance_rescale=0.5, negative_prompt=["dark", "blue"])
    mine = ours(PROMPTS, steps=5, seed=11, **kw)
    theirs = _stock(stock, 11, 4, num_inference_steps=5, **kw)
    assert psnr(mine, theirs) >= 40
    # The comparison has power: another negative prompt, or another seed, is visibly different.
    assert psnr(mine, _stock(stock, 11, 4, num_inference_steps=5, **{**kw, "negative_prompt": None})) < 40
    assert psnr(mine, _stock(stock, 12, 4, num_inference_steps=5, **kw)) < 30


def test_same_images_with_a_stochastic_sampler(pipes):
    ours, stock = pipes
    if ours.schedule.is_flow:
        pytest.skip("euler_a has no flow form (refusal tested in test_ldm_samplers)")
    stock.scheduler = EulerAncestralDiscreteScheduler.from_config(stock.scheduler.config)
    mine = ours(PROMPTS, steps=4, sampler="euler_a", guidance_scale=3.0, seed=5)
    assert psnr(mine, _stock(stock, 5, 2, num_inference_steps=4, guidance_scale=3.0)) >= 40


def test_same_images_without_guidance(pipes):
    ours, stock = pipes
    mine = ours(PROMPTS, steps=3, sampler="dpmpp_2m", guidance_scale=1.0, seed=0)
    assert psnr(mine, _stock(stock, 0, 2, num_inference_steps=3, guidance_scale=1.0)) >= 40


def _max_pixel_difference(a: list, b: list) -> int:
    x = np.stack([np.asarray(i, dtype=np.int64) for i in a])
    y = np.stack([np.asarray(i, dtype=np.int64) for i in b])
    return int(np.abs(x - y).max())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_swapped_the_diffusers_way_gives_our_images(saved, name):
    """``Cls.from_config(pipe.scheduler.config)``, the diffusers way (Karras sigmas asked for as
    diffusers users do), samples exactly like ``ldm-generate --sampler name``, guided and unguided."""
    ours, stock, loaded = saved
    try:
        cls = type(build_sampler(name, ours.schedule))
    except ValueError:
        pytest.skip(f"{name} is refused for this schedule (tested in test_ldm_samplers)")
    kwargs = {"use_karras_sigmas": True} if name == "dpmpp_2m_karras" else {}
    stock.scheduler = cls.from_config(loaded.config, **kwargs)
    if not hasattr(stock.scheduler, "init_noise_sigma"):
        # diffusers' FlowMatch* schedulers lack it and StableDiffusionPipeline multiplies by it
        # (README "Loading the result in diffusers" documents this one line)
        stock.scheduler.init_noise_sigma = 1.0
    for scale in (1.0, 3.0):
        mine = ours(PROMPTS, steps=4, sampler=name, guidance_scale=scale, seed=5)
        theirs = _stock(stock, 5, 2, num_inference_steps=4, guidance_scale=scale)
        assert _max_pixel_difference(mine, theirs) == 0, (name, scale)


def test_only_the_karras_variant_needs_a_from_config_keyword(saved):
    ours, _, loaded = saved
    needs = {n: i["from_config_kwargs"] for n, i in ours.manifest["stock_diffusers"]["schedulers"].items()
             if i["from_config_kwargs"]}  # fmt: skip
    assert needs == ({} if ours.schedule.is_flow else {"dpmpp_2m_karras": {"use_karras_sigmas": True}})
    classes = {n: i["class"] for n, i in ours.manifest["stock_diffusers"]["schedulers"].items()}
    assert all(classes[n] == type(build_sampler(n, ours.schedule)).__name__ for n in classes)
    assert all(hasattr(diffusers, c) for c in classes.values())
    if not ours.schedule.is_flow:  # the saved file states what the diffusers defaults would get wrong
        assert loaded.config["clip_sample"] is False
        assert DDIMScheduler.from_config(loaded.config).config.clip_sample is False


@pytest.fixture(scope="module")
def zeros_null(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeros")
    tiny_pipeline(root, null="zeros").save_pretrained(root / "pipe")
    stock = StableDiffusionPipeline.from_pretrained(root / "pipe")
    stock.set_progress_bar_config(disable=True)
    return LatentDiffusionPipeline.from_pretrained(root / "pipe"), stock, root / "pipe"


def test_null_zeros_needs_zero_negative_embeddings_in_stock_diffusers(zeros_null):
    """With ``null=zeros`` stock diffusers matches only when given the zeros the manifest names."""
    ours, stock, folder = zeros_null
    note = json.loads((folder / "ldm_manifest.json").read_text())["stock_diffusers"]["unconditional"]
    assert note["negative_prompt_embeds"] == "zeros"
    shape = (len(PROMPTS), *note["shape"][1:])
    mine = ours(PROMPTS, steps=3, guidance_scale=4.0, seed=2)
    zeros = torch.zeros(shape)
    assert _max_pixel_difference(mine, _stock(stock, 2, 2, num_inference_steps=3, guidance_scale=4.0,
                                              negative_prompt_embeds=zeros)) == 0  # fmt: skip
    # Without them stock diffusers encodes "" for the unguided branch: another image.
    assert psnr(mine, _stock(stock, 2, 2, num_inference_steps=3, guidance_scale=4.0)) < 40
