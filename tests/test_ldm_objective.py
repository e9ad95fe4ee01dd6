"""ldm.objective: the forward process, targets and min-SNR weights, checked by identities."""

import pytest
import torch

from ldm.objective import DiffusionConfig, DiffusionObjective, NoiseScheduleConfig
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
