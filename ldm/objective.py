"""The diffusion training objective: noise schedule, prediction target, loss weighting.

Kept apart from the network, as in EDM's ``loss.py``: the UNet is an opaque ``Denoiser``
``(x_t [B, C, h, w], t [B], hidden [B, L, D]) -> output [B, C, h, w]`` and this module decides
which t and noise it sees and what its output is compared with.

Notation (DDPM, Ho et al. 2020; v: Salimans & Ho 2022, eq. 9 of "Progressive Distillation"):
    alpha_bar_t = prod_{s<=t} (1 - beta_s),  a = sqrt(alpha_bar_t),  s = sqrt(1 - alpha_bar_t)
    x_t = a * x_0 + s * eps                  (``DDPMScheduler.add_noise``)
    v   = a * eps - s * x_0                  (``DDPMScheduler.get_velocity``)
    SNR(t) = a^2 / s^2 = alpha_bar_t / (1 - alpha_bar_t)
The forward-process maths comes from diffusers' ``DDPMScheduler`` so that training and every
diffusers sampler agree on alpha_bar_t bit for bit.

Flow matching / rectified flow (``prediction_type="flow_prediction"``; Liu et al. 2022, Lipman et
al. 2022; SD3: Esser et al. 2024, eqs. 1-3), continuous t in [0, 1]:
    x_t = (1 - t) * x_0 + t * eps            (``FlowMatchEulerDiscreteScheduler.scale_noise``)
    v   = eps - x_0                          (the velocity dx_t/dt the network predicts)
    x_0 = x_t - t * v,   eps = x_t + (1 - t) * v,   SNR(t) = (1 - t)^2 / t^2
The network sees t * num_train_timesteps (as SD3 and diffusers' flow schedulers feed it), so it
is the same ``UNet2DConditionModel`` whatever the objective and knows nothing about schedules.
Training t can be drawn uniform or logit-normal (SD3 §3.1, eq. 19) and shifted towards noise
(SD3 eq. 23: t' = s t / (1 + (s - 1) t), optionally s proportional to the resolution).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import math

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction", "flow_prediction"]
TimestepSpacing = Literal["trailing", "leading", "linspace"]
TimestepSampling = Literal["uniform", "logit_normal"]

# (x_t [B, C, h, w], t [B] (long index, or float t * T for flow), text hidden [B, L, D]) -> output [B, C, h, w]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Our schedule names -> diffusers' ``beta_schedule`` names.
_DIFFUSERS_BETA_SCHEDULE = {
    "linear": "linear",  # DDPM: betas linear in [beta_start, beta_end]
    "scaled_linear": "scaled_linear",  # LDM / SD: sqrt(beta) linear
    "cosine": "squaredcos_cap_v2",  # Nichol & Dhariwal 2021, eq. 17 (beta_start/end unused)
}


@dataclass(frozen=True)
class NoiseScheduleConfig:
    """The forward process and what the network predicts; shared by training and all samplers."""

    num_train_timesteps: int = 1000
    """Discrete training steps T (flow: the factor t is multiplied by before the network sees it)."""
    beta_schedule: BetaSchedule = "scaled_linear"
    """Beta schedule of the discrete (epsilon / v) process; unused by flow_prediction."""
    beta_start: float = 0.00085
    """First beta of the linear / scaled_linear schedules."""
    beta_end: float = 0.012
    """Last beta of the linear / scaled_linear schedules."""
    zero_terminal_snr: bool = False
    """Lin et al. 2023 Alg. 1: rescale so alpha_bar_T = 0 (pure noise at the last step); needs
    v_prediction and trailing timesteps. Flow already ends at pure noise (t = 1)."""
    prediction_type: PredictionType = "epsilon"
    """What the network predicts: epsilon, v_prediction (Salimans & Ho 2022), or flow_prediction
    (rectified flow: x_t = (1-t) x_0 + t eps, velocity eps - x_0)."""
    timestep_spacing: TimestepSpacing = "trailing"
    """How discrete samplers space their timesteps: trailing always includes t = T-1 (Lin et al.
    Table 2); leading (steps_offset 1) is SD 1.5's. Flow samplers space t evenly in [0, 1]."""
    flow_shift: float = 1.0
    """flow_prediction only: samplers' time shift t' = s t / (1 + (s-1) t) (SD3 eq. 23; SD3 uses 3.0
    at 1024 px); > 1 spends more steps at high noise. Also the training shift unless
    DiffusionConfig.timestep_shift is set."""

    def __post_init__(self) -> None:
        if self.beta_schedule not in _DIFFUSERS_BETA_SCHEDULE:
            raise ValueError(
                f"unknown beta_schedule {self.beta_schedule!r}; choose one of {sorted(_DIFFUSERS_BETA_SCHEDULE)}"
            )
        if self.prediction_type not in ("epsilon", "v_prediction", "flow_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon', 'v_prediction' or 'flow_prediction', not {self.prediction_type!r}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, not {self.num_train_timesteps}")
        if not (math.isfinite(self.beta_start) and math.isfinite(self.beta_end) and 0 < self.beta_start < self.beta_end < 1):
            raise ValueError(f"beta_start={self.beta_start} and beta_end={self.beta_end} must satisfy 0 < beta_start < beta_end < 1")
        if not (math.isfinite(self.flow_shift) and self.flow_shift > 0):
            raise ValueError(f"flow_shift must be a positive number, not {self.flow_shift}")
        if self.is_flow and self.zero_terminal_snr:
            raise ValueError(
                "zero_terminal_snr applies to the discrete (epsilon / v) schedules; flow_prediction already "
                "reaches pure noise at t = 1: leave zero_terminal_snr off."
            )
        if not self.is_flow and self.flow_shift != 1.0:
            raise ValueError(
                f"flow_shift={self.flow_shift} only applies to prediction_type='flow_prediction'; for "
                "discrete schedules shift the training timesteps with DiffusionConfig.timestep_shift."
            )
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "zero_terminal_snr=True needs prediction_type='v_prediction': at SNR 0 the noisy input "
                "is pure noise, so predicting epsilon is trivial and x_0 cannot be recovered (Lin et al. 2023, §3.2)."
            )
        if self.zero_terminal_snr and self.timestep_spacing != "trailing":
            raise ValueError(
                "zero_terminal_snr=True needs timestep_spacing='trailing' so sampling starts at the "
                "zero-SNR step t = T-1 (Lin et al. 2023, §3.3)."
            )

    @property
    def is_flow(self) -> bool:
        """Rectified flow (continuous t in [0, 1]) rather than a discrete DDPM schedule."""
        return self.prediction_type == "flow_prediction"

    def diffusers_kwargs(self) -> dict:
        """Keyword arguments every diffusers scheduler built from this schedule shares."""
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=_DIFFUSERS_BETA_SCHEDULE[self.beta_schedule],
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
            timestep_spacing=self.timestep_spacing,
            # StableDiffusionPipeline rewrites any other value to 1 on load; only "leading" uses it.
            steps_offset=1,
        )


NOISE_SCHEDULE_PRESETS: dict[str, NoiseScheduleConfig] = {
    "sd": NoiseScheduleConfig(),
    "ddpm": NoiseScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "cosine": NoiseScheduleConfig(beta_schedule="cosine"),
    "sd_v_zero_snr": NoiseScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True),
    "flow": NoiseScheduleConfig(prediction_type="flow_prediction"),
}


@dataclass(frozen=True)
class DiffusionConfig:
    """Everything the stage-3 loss needs besides the model and the data."""

    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    """The forward process and prediction type (saved with the pipeline; samplers read it)."""
    min_snr_gamma: float | None = None
    """Min-SNR-gamma weighting (Hang et al. 2023): weight the x_0 error by min(SNR, gamma), in every
    parameterisation; None = plain MSE on the prediction. Paper: 5."""
    offset_noise: float = 0.0
    """Offset noise (Guttenberg 2023): add offset * N(0, 1) per (sample, channel) so the model can
    change the mean brightness. 0 disables; 0.05-0.1 is typical."""
    timestep_sampling: TimestepSampling = "uniform"
    """Training t distribution: uniform, or logit_normal (SD3 eq. 19: t = sigmoid(N(mean, std)),
    more weight on middle t). Discrete schedules draw u in [0, 1) and use step floor(u * T)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal's normal (SD3's best: 0.0)."""
    logit_std: float = 1.0
    """Std of the logit-normal's normal (SD3's best: 1.0)."""
    timestep_shift: float | None = None
    """Shift s of the training t towards noise, SD3 eq. 23: t' = s t / (1 + (s-1) t) for flow; for
    discrete schedules the step whose SNR is SNR(t) / s^2, the same SNR change. None: the
    schedule's flow_shift for flow (train as the samplers step), 1 (no shift) for discrete."""
    shift_base_size: int | None = None
    """Resolution-dependent shift (SD3 §5.3.2): when set, s is multiplied by
    sqrt(h * w) / shift_base_size for latents of h x w, so larger images get more noise."""

    def __post_init__(self) -> None:
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive or None, not {self.min_snr_gamma}")
        if not self.offset_noise >= 0:
            raise ValueError(f"offset_noise must be >= 0, not {self.offset_noise}")
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', not {self.timestep_sampling!r}")
        if not (math.isfinite(self.logit_mean) and math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ValueError(f"logit_mean must be finite and logit_std positive, not {self.logit_mean}, {self.logit_std}")
        if self.timestep_shift is not None and not (math.isfinite(self.timestep_shift) and self.timestep_shift > 0):
            raise ValueError(f"timestep_shift must be a positive number or None, not {self.timestep_shift}")
        if self.shift_base_size is not None and self.shift_base_size < 1:
            raise ValueError(f"shift_base_size must be a positive latent side length or None, not {self.shift_base_size}")


DIFFUSION_PRESETS: dict[str, DiffusionConfig] = {
    "sd": DiffusionConfig(),
    "sd_min_snr": DiffusionConfig(min_snr_gamma=5.0),
    "v_zero_snr": DiffusionConfig(schedule=NOISE_SCHEDULE_PRESETS["sd_v_zero_snr"], min_snr_gamma=5.0),
    # Rectified flow as SD3 trains it: logit-normal(0, 1) t, no shift at this size.
    "flow": DiffusionConfig(schedule=NOISE_SCHEDULE_PRESETS["flow"], timestep_sampling="logit_normal"),
}


class FlowTrainingScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching scheduler plus DDPM's ``add_noise(x_0, eps, timesteps)`` call form,
    timesteps on the network's scale (t * T), so code written for ``objective.scheduler.add_noise``
    and ``objective.target`` (a held-out loss at step 250) is right for flow too."""

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = (timesteps.to(original.device).double() / self.config.num_train_timesteps).to(original.dtype)
        t = t.view(-1, *([1] * (original.ndim - 1)))  # [B, 1, 1, 1]
        return (1.0 - t) * original + t * noise


def training_scheduler(schedule: NoiseScheduleConfig) -> DDPMScheduler | FlowTrainingScheduler:
    """The diffusers scheduler whose maths defines q(x_t | x_0) for training."""
    if schedule.is_flow:
        return FlowTrainingScheduler(num_train_timesteps=schedule.num_train_timesteps, shift=1.0)
    return DDPMScheduler(
        **schedule.diffusers_kwargs(), rescale_betas_zero_snr=schedule.zero_terminal_snr, clip_sample=False
    )


def shift_time(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """SD3 eq. 23, t in [0, 1]: t' = s t / (1 + (s - 1) t); it divides SNR = ((1-t)/t)^2 by s^2."""
    return shift * t / (1.0 + (shift - 1.0) * t)


class DiffusionObjective:
    """Draws (t, noise), noises the latents, calls the denoiser and returns the weighted MSE.

    Random draws, in this order, all from the ``generator`` passed to ``loss``: timesteps [B],
    noise [B, C, h, w], then (if offset_noise > 0) the offset [B, C, 1, 1]. Draws happen on the
    generator's device and are moved to the latents' device, so a CPU generator gives the same
    numbers whatever device trains. Timesteps are integer steps in [0, T) for discrete schedules
    and floats t in [0, 1] for flow; ``model_timesteps`` turns them into what the network sees.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        self.scheduler = training_scheduler(cfg.schedule)
        if cfg.schedule.is_flow:
            self.snr = None
        else:
            alpha_bar = self.scheduler.alphas_cumprod.clone().double()  # [T]
            self.snr = (alpha_bar / (1.0 - alpha_bar)).float()  # [T]; 0 at t=T-1 with zero-SNR

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.schedule.num_train_timesteps

    @property
    def is_flow(self) -> bool:
        return self.cfg.schedule.is_flow

    def timestep_shift(self, latent_size: tuple[int, int] | None = None) -> float:
        """The training shift s for latents of ``latent_size`` (h, w); 1 means none."""
        shift = self.cfg.timestep_shift
        if shift is None:
            shift = self.cfg.schedule.flow_shift if self.is_flow else 1.0
        if self.cfg.shift_base_size is not None:
            if latent_size is None:
                raise ValueError("a resolution-dependent shift (shift_base_size) needs the latent size")
            shift *= math.sqrt(latent_size[0] * latent_size[1]) / self.cfg.shift_base_size
        return shift

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator, latent_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Training timesteps [B] on the generator's device: long steps, or float t in [0, 1] for flow.

        Discrete + uniform + no shift draws ``randint(0, T)`` exactly as before these options existed.
        """
        shift = self.timestep_shift(latent_size)
        device = generator.device
        if not self.is_flow and self.cfg.timestep_sampling == "uniform" and shift == 1.0:
            return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)
        if self.cfg.timestep_sampling == "logit_normal":
            z = torch.randn((batch_size,), generator=generator, device=device, dtype=torch.float64)
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        else:
            u = torch.rand((batch_size,), generator=generator, device=device, dtype=torch.float64)
        if self.is_flow:
            return shift_time(u, shift).float()
        steps = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        return self._shift_steps(steps, shift)

    def _shift_steps(self, steps: torch.Tensor, shift: float) -> torch.Tensor:
        """The first step whose SNR is at most SNR(step) / shift^2 (SD3 eq. 23's SNR change)."""
        if shift == 1.0:
            return steps
        log_snr = self.snr.double().log().to(steps.device)  # [T], decreasing (-inf at zero SNR)
        target = log_snr[steps] - 2.0 * math.log(shift)
        # searchsorted needs increasing values: search -log_snr for -target
        index = torch.searchsorted(-log_snr, -target, right=False)
        return index.clamp(0, self.num_train_timesteps - 1)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network is fed: the discrete step itself, or t * T for flow (as SD3 and
        diffusers' flow samplers feed it)."""
        if self.is_flow:
            return timesteps.float() * self.num_train_timesteps
        return timesteps

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """eps ~ N(0, I) shaped like ``latents`` [B, C, h, w], plus offset noise if configured."""
        b, c = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=generator, device=generator.device)
        if self.cfg.offset_noise > 0:
            offset = torch.randn((b, c, 1, 1), generator=generator, device=generator.device)
            noise = noise + self.cfg.offset_noise * offset
        return noise.to(device=latents.device, dtype=latents.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t [B, C, h, w]: a x_0 + s eps (diffusers' DDPM maths), or (1 - t) x_0 + t eps for flow."""
        if self.is_flow:
            t = timesteps.to(device=latents.device, dtype=latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
            return (1.0 - t) * latents + t * noise
        return self.scheduler.add_noise(latents, noise, timesteps.to(latents.device))

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What a perfect denoiser outputs at (x_0, eps, t): eps, v = a*eps - s*x_0, or eps - x_0 (flow)."""
        if self.cfg.schedule.prediction_type == "epsilon":
            return noise
        if self.is_flow:
            return noise - latents
        return self.scheduler.get_velocity(latents, noise, timesteps.to(latents.device))

    def validation_pair(
        self, latents: torch.Tensor, noise: torch.Tensor, t: int | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, network timesteps [B], target) at one fixed t for a held-out loss comparable over time.

        ``t`` an int: a discrete step in [0, T) (flow uses t / T); a float: t in [0, 1] (discrete
        schedules use step round(t * T), at most T - 1). So ``VAL_TIMESTEPS = (250, 750)`` means
        the same noise levels' neighbourhood for both kinds of model."""
        n, steps = len(latents), self.num_train_timesteps
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"t must be an int step or a float in [0, 1], not {t!r}")
        if isinstance(t, int) and not 0 <= t < steps:
            raise ValueError(f"a discrete validation step must be in [0, {steps}), not {t}")
        if isinstance(t, float) and not 0.0 <= t <= 1.0:
            raise ValueError(f"a continuous validation t must be in [0, 1], not {t}")
        if self.is_flow:
            ts = torch.full((n,), t / steps if isinstance(t, int) else t, device=latents.device)
        else:
            step = t if isinstance(t, int) else min(round(t * steps), steps - 1)
            ts = torch.full((n,), step, device=latents.device, dtype=torch.long)
        return self.add_noise(latents, noise, ts), self.model_timesteps(ts), self.target(latents, noise, ts)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample weight [B] of the squared error in the prediction's own space.

        Min-SNR-gamma weights the x_0 error by min(SNR, gamma) (Hang et al. 2023, eq. 8). The
        prediction errors relate to the x_0 error as |x0 - x0_hat|^2 = |eps - eps_hat|^2 / SNR,
        |x0 - x0_hat|^2 = |v - v_hat|^2 / (SNR + 1) and, for flow (x_0 = x_t - t v),
        |x0 - x0_hat|^2 = t^2 |v - v_hat|^2, so the weight on the MSE is
            epsilon:  min(SNR, gamma) / SNR       = min(1, gamma / SNR)   (1 wherever SNR < gamma)
            v:        min(SNR, gamma) / (SNR + 1)
            flow:     min(SNR, gamma) * t^2,   SNR = (1 - t)^2 / t^2
        """
        if self.cfg.min_snr_gamma is None:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        gamma = self.cfg.min_snr_gamma
        if self.is_flow:
            t = timesteps.double()
            snr = (1.0 - t).pow(2) / t.pow(2)  # inf at t = 0, where the weight is gamma * 0 = 0
            return (snr.clamp(max=gamma) * t.pow(2)).float()
        snr = self.snr.to(timesteps.device)[timesteps]  # [B]
        if self.cfg.schedule.prediction_type == "epsilon":
            # gamma / SNR written this way stays finite: SNR > 0 whenever eps prediction is allowed.
            return torch.clamp(gamma / snr, max=1.0)
        return torch.clamp(snr, max=gamma) / (snr + 1.0)

    def loss(
        self,
        denoiser: Denoiser,
        latents: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted denoising loss for one batch.

        latents: normalised latents x_0 [B, C, h, w]; cond: text hidden states [B, L, D] (caption
        dropout already applied, ``ldm.conditioning``). Returns the scalar loss and
        detached tensors to log (no ``.item()`` here: callers sync only at log intervals).
        """
        timesteps = self.sample_timesteps(latents.shape[0], generator, tuple(latents.shape[-2:]))
        noise = self.sample_noise(latents, generator)
        t = timesteps.to(latents.device)
        noisy = self.add_noise(latents, noise, t)  # x_t [B, C, h, w]
        prediction = denoiser(noisy, self.model_timesteps(t), cond)
        target = self.target(latents, noise, t)
        mse = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, latents.ndim)))  # [B]
        weights = self.loss_weights(t).to(mse.device)
        loss = (weights * mse).mean()
        return loss, {"mse": mse.mean().detach(), "loss_weight": weights.mean()}
