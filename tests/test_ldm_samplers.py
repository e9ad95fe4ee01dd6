"""ldm.samplers: every sampler carries the training schedule and reaches x0 with a perfect model."""

import pytest
import torch

from ldm.objective import DiffusionObjective, DiffusionConfig, NoiseScheduleConfig
from ldm.samplers import SAMPLERS, build_sampler, denoise_latents

SCHEDULES = {
    "eps": NoiseScheduleConfig(),
    "v": NoiseScheduleConfig(prediction_type="v_prediction", beta_schedule="cosine"),
    "v_zero_snr": NoiseScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True),
}


def _oracle(scheduler, x0, prediction_type):
    """The exact denoiser for data that is a single point x0, at the noise level being sampled."""

    def denoise(x_t, t, hidden):
        if hasattr(scheduler, "sigmas"):  # sigma-space samplers: the sigma of the current step
            index = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
            alpha_bar = 1 / (1 + scheduler.sigmas[index].double() ** 2)
        else:
            alpha_bar = scheduler.alphas_cumprod[int(t)].double()
        a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        if prediction_type == "epsilon":
            return ((x_t.double() - a * x0) / s).float()
        return ((a * x_t.double() - x0) / s).float()  # v = a*eps - s*x0 with eps = (x_t - a*x0)/s

    return denoise


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_reaches_x0_with_a_perfect_model(name, schedule_name):
    schedule = SCHEDULES[schedule_name]
    if name == "heun" and schedule.zero_terminal_snr:
        pytest.skip("diffusers' Heun has no zero-SNR option (refusal tested below)")
    sched = build_sampler(name, schedule)
    assert sched.config.prediction_type == schedule.prediction_type
    assert sched.config.timestep_spacing == schedule.timestep_spacing
    assert sched.config.get("rescale_betas_zero_snr", False) == schedule.zero_terminal_snr
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=g).double()
    noise = torch.randn(2, 4, 4, 4, generator=g)
    out = denoise_latents(sched, _oracle(sched, x0, schedule.prediction_type), noise, torch.zeros(2, 1, 1), 8, g)
    torch.testing.assert_close(out.double(), x0, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("schedule", list(SCHEDULES.values()))
def test_samplers_use_the_training_alpha_bar(schedule):
    train = DiffusionObjective(DiffusionConfig(schedule)).scheduler.alphas_cumprod
    for name in SAMPLERS:
        if name == "heun" and schedule.zero_terminal_snr:
            continue
        ab = build_sampler(name, schedule).alphas_cumprod
        # sigma-space samplers clamp alpha_bar_T = 0 to 2**-24 so sigma_T stays finite
        torch.testing.assert_close(ab[:-1], train[:-1], msg=name)
        assert abs(float(ab[-1] - train[-1])) <= 2**-24


def test_zero_snr_sampling_starts_at_the_last_training_step():
    sched = build_sampler("ddim", SCHEDULES["v_zero_snr"])
    sched.set_timesteps(10)
    assert int(sched.timesteps[0]) == 999


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of: ddpm, ddim, euler"):
        build_sampler("plms", NoiseScheduleConfig())


def test_heun_refuses_zero_snr_clearly():
    with pytest.raises(ValueError, match="does not support zero-terminal-SNR"):
        build_sampler("heun", SCHEDULES["v_zero_snr"])
