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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from diffusers import DDPMScheduler

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSpacing = Literal["trailing", "leading", "linspace"]

# (x_t [B, C, h, w], t [B] long, text hidden [B, L, D]) -> model output [B, C, h, w]
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
    beta_schedule: BetaSchedule = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    # shift/scale sqrt(alpha_bar) so alpha_bar_T = 0 (pure noise at the last step). Needs v
    # prediction (eps is unidentifiable at SNR 0) and "trailing" timesteps at sampling (§3.3).
    zero_terminal_snr: bool = False
    prediction_type: PredictionType = "epsilon"
    # How samplers space their timesteps. "trailing" always includes t = T-1 (Lin et al. Table 2);
    # "leading" (with steps_offset=1) is SD 1.5's original choice.
    timestep_spacing: TimestepSpacing = "trailing"

    def __post_init__(self) -> None:
        if self.beta_schedule not in _DIFFUSERS_BETA_SCHEDULE:
            raise ValueError(
                f"unknown beta_schedule {self.beta_schedule!r}; choose one of {sorted(_DIFFUSERS_BETA_SCHEDULE)}"
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {self.prediction_type!r}")
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
}


@dataclass(frozen=True)
class DiffusionConfig:
    """Everything the stage-3 loss needs besides the model and the data."""

    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    # Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    # Weighting Strategy"): weight the x_0 error by min(SNR, gamma). None = plain MSE. Paper: 5.
    min_snr_gamma: float | None = None
    # Offset noise (Guttenberg 2023): add offset * N(0, 1) per (sample, channel) to the noise so
    # the model learns to change the mean brightness. 0 disables; 0.05-0.1 is typical.
    offset_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive or None, not {self.min_snr_gamma}")
        if self.offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, not {self.offset_noise}")


DIFFUSION_PRESETS: dict[str, DiffusionConfig] = {
    "sd": DiffusionConfig(),
    "sd_min_snr": DiffusionConfig(min_snr_gamma=5.0),
    "v_zero_snr": DiffusionConfig(schedule=NOISE_SCHEDULE_PRESETS["sd_v_zero_snr"], min_snr_gamma=5.0),
}


def training_scheduler(schedule: NoiseScheduleConfig) -> DDPMScheduler:
    """The diffusers scheduler whose alpha_bar defines q(x_t | x_0) for training."""
    return DDPMScheduler(
        **schedule.diffusers_kwargs(), rescale_betas_zero_snr=schedule.zero_terminal_snr, clip_sample=False
    )


class DiffusionObjective:
    """Draws (t, noise), noises the latents, calls the denoiser and returns the weighted MSE.

    Random draws, in this order, all from the ``generator`` passed to ``loss``: timesteps [B],
    noise [B, C, h, w], then (if offset_noise > 0) the offset [B, C, 1, 1]. Draws happen on the
    generator's device and are moved to the latents' device, so a CPU generator gives the same
    numbers whatever device trains.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        self.scheduler = training_scheduler(cfg.schedule)
        alpha_bar = self.scheduler.alphas_cumprod.clone().double()  # [T]
        self.snr = (alpha_bar / (1.0 - alpha_bar)).float()  # [T]; 0 at t=T-1 with zero-SNR

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.schedule.num_train_timesteps

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """t ~ Uniform{0, ..., T-1}, shape [B], on the generator's device."""
        return torch.randint(
            0, self.num_train_timesteps, (batch_size,), generator=generator, device=generator.device
        )

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """eps ~ N(0, I) shaped like ``latents`` [B, C, h, w], plus offset noise if configured."""
        b, c = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=generator, device=generator.device)
        if self.cfg.offset_noise > 0:
            offset = torch.randn((b, c, 1, 1), generator=generator, device=generator.device)
            noise = noise + self.cfg.offset_noise * offset
        return noise.to(device=latents.device, dtype=latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What a perfect denoiser outputs at (x_0, eps, t): eps, or v = a*eps - s*x_0."""
        if self.cfg.schedule.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps.to(latents.device))

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample weight [B] of the squared error in the prediction's own space.

        Min-SNR-gamma weights the x_0 error by min(SNR, gamma) (Hang et al. 2023, eq. 8). The
        prediction errors relate to the x_0 error as |x0 - x0_hat|^2 = |eps - eps_hat|^2 / SNR and
        |x0 - x0_hat|^2 = |v - v_hat|^2 / (SNR + 1), so the weight on the MSE is
            epsilon:  min(SNR, gamma) / SNR       = min(1, gamma / SNR)   (1 wherever SNR < gamma)
            v:        min(SNR, gamma) / (SNR + 1)
        """
        if self.cfg.min_snr_gamma is None:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        snr = self.snr.to(timesteps.device)[timesteps]  # [B]
        gamma = self.cfg.min_snr_gamma
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
        dropout already applied by ``ldm.conditioning.drop_captions``). Returns the scalar loss and
        detached tensors to log (no ``.item()`` here: callers sync only at log intervals).
        """
        timesteps = self.sample_timesteps(latents.shape[0], generator)
        noise = self.sample_noise(latents, generator)
        t = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)  # x_t [B, C, h, w]
        prediction = denoiser(noisy, t, cond)
        target = self.target(latents, noise, t)
        mse = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, latents.ndim)))  # [B]
        weights = self.loss_weights(timesteps).to(mse.device)
        loss = (weights * mse).mean()
        return loss, {"mse": mse.mean().detach(), "loss_weight": weights.mean()}
