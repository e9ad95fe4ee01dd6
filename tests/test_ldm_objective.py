"""ldm.objective: the forward process, targets and min-SNR weights, checked by identities."""

import pytest
import torch

from diffusers import FlowMatchEulerDiscreteScheduler

from ldm.objective import DiffusionConfig, DiffusionObjective, NoiseScheduleConfig, shift_time
from ldm.samplers import build_sampler

EPS = NoiseScheduleConfig()
V = NoiseScheduleConfig(prediction_type="v_prediction")
V_ZERO = NoiseScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True)


def _coeffs(obj, t):
    ab = obj.scheduler.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def _draw(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 4, 4, generator=g).double(), torch.randn(b, 4, 4, 4, generator=g).double()


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_eps_x0_v_round_trip(schedule):
    obj = DiffusionObjective(DiffusionConfig(NoiseScheduleConfig(beta_schedule=schedule, prediction_type="v_prediction")))
    x0, eps = _draw()
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    a, s = _coeffs(obj, t)
    x_t = obj.scheduler.add_noise(x0, eps, t)
    v = obj.target(x0, eps, t)
    torch.testing.assert_close(x_t, a * x0 + s * eps)
    torch.testing.assert_close(a * x_t - s * v, x0)  # x0 from v
    torch.testing.assert_close(s * x_t + a * v, eps)  # eps from v
    torch.testing.assert_close((x_t - s * eps) / a, x0)  # x0 from eps


def test_zero_terminal_snr():
    plain, zero = DiffusionObjective(DiffusionConfig(V)), DiffusionObjective(DiffusionConfig(V_ZERO))
    assert zero.scheduler.alphas_cumprod[-1] == 0 and zero.snr[-1] == 0
    assert plain.scheduler.alphas_cumprod[-1] > 0.004  # SD's schedule leaves signal at t = T-1
    torch.testing.assert_close(zero.scheduler.alphas_cumprod[0], plain.scheduler.alphas_cumprod[0])
    assert torch.all(zero.snr[1:] < zero.snr[:-1])


@pytest.mark.parametrize("schedule", [EPS, V, V_ZERO])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_training_target_is_what_samplers_expect(schedule, sampler):
    """Feed the perfect model output to a sampler step: its x0 estimate must be the true x0."""
    obj = DiffusionObjective(DiffusionConfig(schedule))
    sched = build_sampler(sampler, schedule)
    sched.set_timesteps(10)
    x0, eps = _draw(b=1)
    x0, eps = x0.float(), eps.float()
    for t in sched.timesteps[:3]:
        tt = t.view(1)
        out = sched.step(obj.target(x0, eps, tt), t, obj.scheduler.add_noise(x0, eps, tt),
                         generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.pred_original_sample, x0, atol=2e-4, rtol=1e-4)


def test_min_snr_weights():
    gamma = 5.0
    t = torch.arange(1000)
    eps = DiffusionObjective(DiffusionConfig(EPS, min_snr_gamma=gamma))
    v = DiffusionObjective(DiffusionConfig(V, min_snr_gamma=gamma))
    snr = eps.snr
    low = snr < gamma
    w_eps, w_v = eps.loss_weights(t), v.loss_weights(t)
    assert low.any() and (~low).any()
    assert torch.all(w_eps[low] == 1)
    torch.testing.assert_close(w_eps[~low], gamma / snr[~low])
    torch.testing.assert_close(w_v[low], snr[low] / (snr[low] + 1))
    torch.testing.assert_close(w_v[~low], gamma / (snr[~low] + 1))
    zero = DiffusionObjective(DiffusionConfig(V_ZERO, min_snr_gamma=gamma)).loss_weights(torch.tensor([999]))
    assert torch.isfinite(zero).all() and zero.item() == 0
    assert torch.all(DiffusionObjective(DiffusionConfig(EPS)).loss_weights(t) == 1)


def _perfect_denoiser(obj, x0, x0_error):
    """Knows x0; its x0 estimate is off by ``x0_error``; outputs in obj's parameterisation."""

    def denoise(x_t, t, hidden):
        a, s = _coeffs(obj, t)
        x0_hat = x0 + x0_error
        eps_hat = (x_t - a * x0_hat) / s
        out = eps_hat if obj.cfg.schedule.prediction_type == "epsilon" else a * eps_hat - s * x0_hat
        return out.float()

    return denoise


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_min_snr_loss_is_parameterisation_free(gamma):
    """Min-SNR weighting targets the x0 error: eps and v models with equal x0 errors get equal loss."""
    x0 = _draw(3)[0]
    err = 0.01 * _draw(4)[0]
    cond = torch.zeros(6, 2, 8)
    losses = {}
    for sched in (EPS, V):
        obj = DiffusionObjective(DiffusionConfig(sched, min_snr_gamma=gamma))
        exact, _ = obj.loss(_perfect_denoiser(obj, x0, 0.0), x0.float(), cond, torch.Generator().manual_seed(7))
        assert exact.item() < 1e-8
        losses[sched.prediction_type], _ = obj.loss(
            _perfect_denoiser(obj, x0, err), x0.float(), cond, torch.Generator().manual_seed(7))
    if gamma is None:
        assert not torch.isclose(losses["epsilon"], losses["v_prediction"], rtol=1e-2)
    else:
        t = DiffusionObjective(DiffusionConfig(EPS)).sample_timesteps(6, torch.Generator().manual_seed(7))
        snr = DiffusionObjective(DiffusionConfig(EPS)).snr[t].double()
        expected = (snr.clamp(max=gamma) * err.pow(2).mean(dim=(1, 2, 3))).mean()
        torch.testing.assert_close(losses["epsilon"].double(), expected, rtol=1e-3, atol=0)
        torch.testing.assert_close(losses["v_prediction"].double(), expected, rtol=1e-3, atol=0)


def test_draws_come_only_from_the_generator():
    obj = DiffusionObjective(DiffusionConfig(V, min_snr_gamma=5.0))
    x0, cond = torch.randn(4, 4, 4, 4), torch.randn(4, 3, 8)
    model = lambda x, t, h: x * 0.5 + h.mean() + t.view(-1, 1, 1, 1) * 1e-3  # noqa: E731
    torch.manual_seed(0)
    a, _ = obj.loss(model, x0, cond, torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the global RNG must not matter
    b, _ = obj.loss(model, x0, cond, torch.Generator().manual_seed(1))
    c, _ = obj.loss(model, x0, cond, torch.Generator().manual_seed(2))
    assert a == b and a != c


def test_offset_noise_shifts_each_channel_by_a_constant():
    x0 = torch.zeros(3, 4, 5, 5)
    base = DiffusionObjective(DiffusionConfig()).sample_noise(x0, torch.Generator().manual_seed(0))
    off = DiffusionObjective(DiffusionConfig(offset_noise=0.1)).sample_noise(x0, torch.Generator().manual_seed(0))
    shift = off - base  # [B, C, h, w], constant over (h, w)
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    assert shift.abs().min() > 0


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseScheduleConfig(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="trailing"):
        NoiseScheduleConfig(prediction_type="v_prediction", zero_terminal_snr=True, timestep_spacing="leading")
    with pytest.raises(ValueError, match="choose one of"):
        NoiseScheduleConfig(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionConfig(min_snr_gamma=0.0)


# -- flow matching ------------------------------------------------------------------------------

FLOW = NoiseScheduleConfig(prediction_type="flow_prediction")


def test_flow_x0_eps_v_round_trip():
    obj = DiffusionObjective(DiffusionConfig(FLOW))
    x0, eps = _draw()
    t = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t = obj.add_noise(x0, eps, t)
    v = obj.target(x0, eps, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tt) * x0 + tt * eps)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(x_t - tt * v, x0)  # x0 from v
    torch.testing.assert_close(x_t + (1 - tt) * v, eps)  # eps from v
    # the same forward process as diffusers' flow-matching scheduler
    ref = FlowMatchEulerDiscreteScheduler().scale_noise(x0, torch.tensor([500.0]), eps)
    torch.testing.assert_close(obj.add_noise(x0, eps, torch.full((6,), 0.5, dtype=torch.float64)), ref)


def test_flow_validation_pair_at_the_ends_and_in_between():
    obj = DiffusionObjective(DiffusionConfig(FLOW))
    x0, eps = _draw(b=2)
    noisy, ts, target = obj.validation_pair(x0, eps, 0.0)
    torch.testing.assert_close(noisy, x0)
    torch.testing.assert_close(target, eps - x0)
    assert torch.all(ts == 0)
    noisy, ts, target = obj.validation_pair(x0, eps, 1.0)
    torch.testing.assert_close(noisy, eps)
    torch.testing.assert_close(target, eps - x0)
    assert torch.all(ts == 1000)  # the network sees t * T, as SD3 and diffusers' flow samplers feed it
    noisy, ts, _ = obj.validation_pair(x0, eps, 250)  # an int is a step: t = 250 / T
    torch.testing.assert_close(noisy, 0.75 * x0 + 0.25 * eps)
    assert torch.all(ts == 250.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        obj.validation_pair(x0, eps, 1.5)


def test_discrete_validation_pair_matches_the_old_call_forms():
    obj = DiffusionObjective(DiffusionConfig(V))
    x0, eps = _draw(b=2)
    ts = torch.full((2,), 250, dtype=torch.long)
    noisy, model_ts, target = obj.validation_pair(x0, eps, 250)
    torch.testing.assert_close(noisy, obj.scheduler.add_noise(x0, eps, ts))
    torch.testing.assert_close(target, obj.target(x0, eps, ts))
    assert torch.equal(model_ts, ts)
    assert torch.equal(obj.validation_pair(x0, eps, 0.25)[1], ts)  # a float t is round(t * T)


def _flow_oracle(obj, x0, x0_error=0.0):
    """Knows the single data point x0 (off by x0_error); reads t from the timesteps it is fed."""

    def denoise(x_t, model_t, hidden):
        t = (model_t.double() / obj.num_train_timesteps).view(-1, 1, 1, 1)
        return ((x_t.double() - (x0 + x0_error)) / t).float()  # v = eps - x0 = (x_t - x0) / t

    return denoise


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_flow_loss_is_zero_for_a_perfect_model_and_min_snr_weighs_the_x0_error(gamma):
    cfg = DiffusionConfig(FLOW, min_snr_gamma=gamma, timestep_sampling="logit_normal")
    obj = DiffusionObjective(cfg)
    x0, cond = _draw(3)[0], torch.zeros(6, 2, 8)
    exact, _ = obj.loss(_flow_oracle(obj, x0), x0.float(), cond, torch.Generator().manual_seed(7))
    assert exact.item() < 1e-8
    err = 0.01 * _draw(4)[0]
    loss, _ = obj.loss(_flow_oracle(obj, x0, err), x0.float(), cond, torch.Generator().manual_seed(7))
    t = obj.sample_timesteps(6, torch.Generator().manual_seed(7), (4, 4)).double()
    x0_mse = err.pow(2).mean(dim=(1, 2, 3))
    if gamma is None:
        expected = (x0_mse / t.pow(2)).mean()  # |v error|^2 = |x0 error|^2 / t^2
    else:
        expected = (((1 - t) / t).pow(2).clamp(max=gamma) * x0_mse).mean()  # as for eps and v
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=0)


def test_logit_normal_and_shifted_timesteps():
    n = 20000
    draw = lambda cfg, size=None: DiffusionObjective(cfg).sample_timesteps(n, torch.Generator().manual_seed(0), size)  # noqa: E731
    t = draw(DiffusionConfig(FLOW, timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 0.8) < 0.03
    plain = draw(DiffusionConfig(FLOW, timestep_sampling="logit_normal"))
    shifted = draw(DiffusionConfig(FLOW, timestep_sampling="logit_normal", timestep_shift=3.0))
    torch.testing.assert_close(shifted, shift_time(plain.double(), 3.0).float())
    # SD3 eq. 23 divides the SNR by s^2
    snr = lambda t: ((1 - t) / t).pow(2)  # noqa: E731
    torch.testing.assert_close(snr(shifted.double()), snr(plain.double()) / 9, rtol=1e-4, atol=0)
    # without timestep_shift the schedule's (sampling) flow_shift is used
    default = draw(DiffusionConfig(NoiseScheduleConfig(prediction_type="flow_prediction", flow_shift=3.0),
                                   timestep_sampling="logit_normal"))  # fmt: skip
    torch.testing.assert_close(default, shifted)
    # resolution-dependent: 16x16 latents at base 8 double the shift
    by_size = draw(DiffusionConfig(FLOW, timestep_sampling="logit_normal", timestep_shift=1.5, shift_base_size=8), (16, 16))
    torch.testing.assert_close(by_size, draw(DiffusionConfig(FLOW, timestep_sampling="logit_normal", timestep_shift=3.0)))
    uniform = draw(DiffusionConfig(FLOW))
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01


def test_discrete_timestep_sampling_options():
    n, g = 5000, lambda: torch.Generator().manual_seed(1)  # noqa: E731
    obj = DiffusionObjective(DiffusionConfig(EPS))
    assert torch.equal(obj.sample_timesteps(n, g()), torch.randint(0, 1000, (n,), generator=g()))  # as before
    logit = DiffusionObjective(DiffusionConfig(EPS, timestep_sampling="logit_normal")).sample_timesteps(n, g())
    assert logit.dtype == torch.long and 0 <= logit.min() and logit.max() <= 999
    assert abs(logit.float().mean().item() - 500) < 15 and logit.float().std() < 0.9 * 1000 / 12**0.5
    shifted = DiffusionObjective(DiffusionConfig(EPS, timestep_sampling="logit_normal", timestep_shift=2.0))
    s = shifted.sample_timesteps(n, g())
    snr = obj.snr.double()
    inside = s < 999  # not clamped at the schedule's end
    assert torch.all(snr[s][inside] <= snr[logit][inside] / 4)  # SNR divided by s^2 ...
    assert torch.all(snr[(s - 1).clamp(min=0)][inside & (s > 0)] > snr[logit][inside & (s > 0)] / 4)  # ... first such step


def test_flow_schedule_refusals():
    with pytest.raises(ValueError, match="flow_prediction already reaches pure noise"):
        NoiseScheduleConfig(prediction_type="flow_prediction", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="only applies to prediction_type='flow_prediction'"):
        NoiseScheduleConfig(flow_shift=3.0)
    with pytest.raises(ValueError, match="flow_shift must be a positive number"):
        NoiseScheduleConfig(prediction_type="flow_prediction", flow_shift=float("nan"))
    with pytest.raises(ValueError, match="logit_std positive"):
        DiffusionConfig(timestep_sampling="logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match="timestep_shift must be a positive number"):
        DiffusionConfig(timestep_shift=-1.0)
    with pytest.raises(ValueError, match="needs the latent size"):
        DiffusionObjective(DiffusionConfig(FLOW, shift_base_size=8)).sample_timesteps(2, torch.Generator())


def test_the_old_validation_call_forms_are_right_for_flow():
    """launch/ code that calls objective.scheduler.add_noise / objective.target with step 250 and
    feeds the network that step gets t = 0.25, exactly like validation_pair(..., 250)."""
    obj = DiffusionObjective(DiffusionConfig(FLOW))
    x0, eps = _draw(b=2)
    ts = torch.full((2,), 250, dtype=torch.long)
    noisy, model_ts, target = obj.validation_pair(x0, eps, 250)
    torch.testing.assert_close(obj.scheduler.add_noise(x0, eps, ts), noisy)
    torch.testing.assert_close(obj.target(x0, eps, ts), target)
    assert torch.equal(model_ts, ts.float())
