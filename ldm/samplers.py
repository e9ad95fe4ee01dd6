"""Named samplers: diffusers schedulers configured from the training noise schedule.

Every sampler is built from the same ``NoiseScheduleConfig`` the model was trained with, so it
carries the beta schedule, prediction type, zero-terminal-SNR rescaling and timestep spacing.
Getting any of these wrong (a v model sampled as epsilon, zero-SNR betas without the rescale)
gives plausible-looking but wrong images, which is why no sampler is ever built without them.

A flow-matching model (``prediction_type="flow_prediction"``) is sampled by the same names where
diffusers has a flow form: euler -> ``FlowMatchEulerDiscreteScheduler``, heun ->
``FlowMatchHeunDiscreteScheduler``, dpmpp_2m and unipc -> their schedulers with
``use_flow_sigmas=True`` and ``flow_shift``; ddpm, ddim, euler_a and dpmpp_2m_karras have none
in diffusers 0.42 (DPM-Solver's Karras branch ignores flow sigmas) and are refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from tqdm.auto import tqdm

from ldm.objective import Denoiser, NoiseScheduleConfig


@dataclass(frozen=True)
class SamplerSpec:
    cls: type[SchedulerMixin]
    options: dict = field(default_factory=dict)
    description: str = ""
    flow_cls: type[SchedulerMixin] | None = None  # the flow-matching form; None: refused for flow models


SAMPLERS: dict[str, SamplerSpec] = {
    # Ancestral DDPM (Ho et al. 2020); needs many steps.
    "ddpm": SamplerSpec(DDPMScheduler, {"clip_sample": False}, "ancestral DDPM, stochastic"),
    # DDIM (Song et al. 2021), eta = 0: deterministic. set_alpha_to_one: the last step returns x_0.
    "ddim": SamplerSpec(DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}, "DDIM, deterministic"),
    # Euler / Heun on the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 1-2).
    "euler": SamplerSpec(EulerDiscreteScheduler, {}, "Euler ODE, deterministic", FlowMatchEulerDiscreteScheduler),
    "euler_a": SamplerSpec(EulerAncestralDiscreteScheduler, {}, "Euler ancestral, stochastic"),
    "heun": SamplerSpec(
        HeunDiscreteScheduler, {}, "Heun 2nd order ODE (2 model calls per step)", FlowMatchHeunDiscreteScheduler
    ),
    # DPM-Solver++(2M) (Lu et al. 2022), optionally on Karras et al.'s sigma spacing.
    "dpmpp_2m": SamplerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM-Solver++ 2M, deterministic",
        DPMSolverMultistepScheduler,
    ),
    "dpmpp_2m_karras": SamplerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM-Solver++ 2M with Karras sigmas",
    ),
    # UniPC (Zhao et al. 2023), 2nd-order predictor-corrector.
    "unipc": SamplerSpec(
        UniPCMultistepScheduler, {"solver_order": 2}, "UniPC bh2, deterministic", UniPCMultistepScheduler
    ),
}

DEFAULT_SAMPLER = "dpmpp_2m"

# diffusers' Heun scheduler has no ``rescale_betas_zero_snr`` option.
_NO_ZERO_SNR = {HeunDiscreteScheduler}


def sampler_names(schedule: NoiseScheduleConfig | None = None) -> list[str]:
    """Every sampler, or those a model trained with ``schedule`` can use."""
    if schedule is None or not schedule.is_flow:
        return [n for n, s in SAMPLERS.items() if schedule is None or not schedule.zero_terminal_snr
                or s.cls not in _NO_ZERO_SNR]  # fmt: skip
    return [n for n, s in SAMPLERS.items() if s.flow_cls is not None]


def _flow_sampler(name: str, spec: SamplerSpec, schedule: NoiseScheduleConfig) -> SchedulerMixin:
    if spec.flow_cls is None:
        raise ValueError(
            f"sampler {name!r} has no flow-matching form in diffusers; a flow_prediction model can use: "
            f"{', '.join(sampler_names(schedule))}"
        )
    if spec.flow_cls in (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler):
        return spec.flow_cls(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.flow_shift)
    # DPM-Solver++ / UniPC in flow mode: sigma = t, alpha = 1 - t, model output = velocity.
    kwargs = {**schedule.diffusers_kwargs(), **spec.options, "use_flow_sigmas": True, "flow_shift": schedule.flow_shift}
    return spec.flow_cls(**kwargs)


def build_sampler(name: str, schedule: NoiseScheduleConfig) -> SchedulerMixin:
    """A fresh diffusers scheduler ``name`` for a model trained with ``schedule``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    spec = SAMPLERS[name]
    if schedule.is_flow:
        return _flow_sampler(name, spec, schedule)
    kwargs = {**schedule.diffusers_kwargs(), **spec.options}
    if schedule.zero_terminal_snr:
        if spec.cls in _NO_ZERO_SNR:
            raise ValueError(
                f"sampler {name!r} ({spec.cls.__name__}) does not support zero-terminal-SNR schedules in "
                f"diffusers; choose one of: {', '.join(n for n, s in SAMPLERS.items() if s.cls not in _NO_ZERO_SNR)}"
            )
        kwargs["rescale_betas_zero_snr"] = True
    return spec.cls(**kwargs)


def denoise_latents(
    scheduler: SchedulerMixin,
    denoiser: Denoiser,
    noise: torch.Tensor,
    hidden: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``scheduler`` from standard-normal ``noise`` [B, C, h, w] to latents x_0 [B, C, h, w].

    The order of operations is StableDiffusionPipeline's (set_timesteps, then scale the initial
    noise by ``init_noise_sigma``; per step scale_model_input, denoise, step with the generator),
    so stochastic samplers draw the same numbers from ``generator`` as stock diffusers does.
    hidden: [B, L, D] text hidden states handed to ``denoiser`` (a CFG wrapper or a bare UNet).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, not {num_inference_steps}")
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    if hasattr(scheduler, "set_begin_index"):
        # Count steps from 0 instead of looking the timestep up: with Karras sigmas on a schedule
        # with a huge sigma_max (cosine, zero-SNR) several sigmas round to the same timestep and
        # diffusers' lookup picks the wrong step (IndexError). Same result whenever timesteps differ.
        scheduler.set_begin_index(0)
    # diffusers' flow-matching schedulers define neither (their x_T is the noise itself).
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if accepts_generator else {}
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        output = denoiser(model_input, t, hidden)
        latents = scheduler.step(output, t, latents, **extra, return_dict=False)[0]
    return latents
