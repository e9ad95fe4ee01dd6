"""ldm.samplers: every sampler carries the training schedule and reaches x0 with a perfect model."""

import pytest
import torch

from ldm.objective import DiffusionObjective, DiffusionConfig, NoiseScheduleConfig
from ldm.samplers import SAMPLERS, build_sampler, denoise_latents, sampler_names

SCHEDULES = {
    "eps": NoiseScheduleConfig(),
    "v": NoiseScheduleConfig(prediction_type="v_prediction", beta_schedule="cosine"),
    "v_zero_snr": NoiseScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True),
    "flow": NoiseScheduleConfig(prediction_type="flow_prediction"),
    "flow_shift3": NoiseScheduleConfig(prediction_type="flow_prediction", flow_shift=3.0),
}
FLOW_SAMPLERS = ["euler", "heun", "dpmpp_2m", "unipc"]


def _oracle(scheduler, x0, prediction_type):
    """The exact denoiser for data that is a single point x0, at the noise level being sampled."""

    def denoise(x_t, t, hidden):
        index = getattr(scheduler, "step_index", None)
        if index is None and hasattr(scheduler, "begin_index"):
            index = scheduler.begin_index
        if prediction_type == "flow_prediction":
            # x_t = (1 - s) x0 + s eps with s = sigma of this step; v = eps - x0 = (x_t - x0) / s
            sigma = scheduler.sigmas[index].double()
            return ((x_t.double() - x0) / sigma).float()
        if hasattr(scheduler, "sigmas"):  # sigma-space samplers: the sigma of the current step
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
    if schedule.is_flow and name not in FLOW_SAMPLERS:
        pytest.skip("no flow-matching form in diffusers (refusal tested below)")
    sched = build_sampler(name, schedule)
    if schedule.is_flow:
        assert sched.config.get("shift", sched.config.get("flow_shift")) == schedule.flow_shift
        assert sched.config.get("prediction_type", "flow_prediction") == "flow_prediction"
    else:
        assert sched.config.prediction_type == schedule.prediction_type
        assert sched.config.timestep_spacing == schedule.timestep_spacing
        assert sched.config.get("rescale_betas_zero_snr", False) == schedule.zero_terminal_snr
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=g).double()
    noise = torch.randn(2, 4, 4, 4, generator=g)
    out = denoise_latents(sched, _oracle(sched, x0, schedule.prediction_type), noise, torch.zeros(2, 1, 1), 8, g)
    torch.testing.assert_close(out.double(), x0, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES.values() if not s.is_flow])
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


def test_flow_models_refuse_samplers_without_a_flow_form():
    schedule = SCHEDULES["flow"]
    assert sampler_names(schedule) == FLOW_SAMPLERS
    for name in set(SAMPLERS) - set(FLOW_SAMPLERS):
        with pytest.raises(ValueError, match="has no flow-matching form in diffusers; a flow_prediction model can use: "
                           "euler, heun, dpmpp_2m, unipc"):  # fmt: skip
            build_sampler(name, schedule)


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_flow_samplers_apply_the_shift_and_start_from_pure_noise(name):
    """Shift s maps the sampler's unshifted t to s t / (1 + (s-1) t): more steps at high noise."""
    plain, shifted = build_sampler(name, SCHEDULES["flow"]), build_sampler(name, SCHEDULES["flow_shift3"])
    plain.set_timesteps(6)
    shifted.set_timesteps(6)
    assert float(plain.sigmas[0]) > 0.99 and float(plain.sigmas[-1]) == 0.0
    assert torch.all(shifted.sigmas[1:-1] > plain.sigmas[1:-1])


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_flow_samplers_feed_the_network_t_times_T_as_training_does(name):
    """A perfect velocity model that reads t only from the timestep it is fed (t = timestep / T, the
    inverse of DiffusionObjective.model_timesteps) still reaches the single data point x0."""
    schedule = SCHEDULES["flow_shift3"]
    obj = DiffusionObjective(DiffusionConfig(schedule))
    sched = build_sampler(name, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=g).double()
    noise = torch.randn(2, 4, 4, 4, generator=g)

    def velocity(x_t, t, hidden):
        t = torch.as_tensor(t, dtype=torch.float64) / obj.num_train_timesteps
        return ((x_t.double() - x0) / t).float()

    out = denoise_latents(sched, velocity, noise, torch.zeros(2, 1, 1), 8, g)
    # DPM-Solver++ and UniPC feed int(t * T) (diffusers casts their flow timesteps to int64)
    tol = 1e-4 if name in ("euler", "heun") else 2e-2
    torch.testing.assert_close(out.double(), x0, atol=tol, rtol=tol)
