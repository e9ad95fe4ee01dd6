"""Post-hoc EMA (EDM2): power-function EMA tracking, snapshots, least-squares reconstruction, the
train_ldm option and the launch/posthoc_ema.py command."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from launch.training.ema import (
    PostHocEMAConfig,
    PowerEMA,
    gamma_of,
    list_snapshots,
    posthoc_coefficients,
    reconstruct,
    sigma_rel_of,
)


class Vector(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


def trajectory(steps: int, n: int = 64, seed: int = 0) -> torch.Tensor:
    """[steps, n] a noisy drifting weight trajectory (what SGD iterates look like, roughly)."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.linspace(0, 1, steps)[:, None] * torch.randn(1, n, generator=g)
    return drift + 0.3 * torch.randn(steps, n, generator=g).cumsum(0) / math.sqrt(steps) + 0.2 * torch.randn(steps, n, generator=g)


def track(traj: torch.Tensor, sigma_rels, folder=None, every: int = 0) -> PowerEMA:
    model = Vector(traj.shape[1])
    ema = PowerEMA(model, tuple(sigma_rels))
    for step, value in enumerate(traj, start=1):
        model.w.data.copy_(value)
        ema.update(model)
        if folder is not None and step % every == 0:
            ema.save_snapshot(folder, step)
    return ema


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2_values():
    for s in (0.01, 0.05, 0.10, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(s)) == pytest.approx(s, rel=1e-10)
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2: sigma_rel 0.05 <-> gamma ~ 16.97
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            gamma_of(bad)
    with pytest.raises(ValueError, match="sigma_rels is empty"):
        PostHocEMAConfig(snapshot_every=10, sigma_rels=())


def test_power_ema_weights_each_step_by_the_integrated_profile():
    # One-hot weights: the average's entry tau is exactly the weight step tau received.
    steps, sigma = 40, 0.1
    ema = track(torch.eye(steps), [sigma])
    gamma = gamma_of(sigma)
    tau = np.arange(1, steps + 1, dtype=np.float64)
    expected = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / steps ** (gamma + 1)
    np.testing.assert_allclose(ema.weights(0)["w"].double().numpy(), expected, rtol=1e-4, atol=1e-7)
    assert ema.weights(0)["w"].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_coefficients_pick_a_tracked_profile_alone():
    times = [100, 100, 200, 200, 300, 300]
    gammas = [gamma_of(0.05), gamma_of(0.10)] * 3
    x, err = posthoc_coefficients(times, gammas, 300, gamma_of(0.10))
    np.testing.assert_allclose(x, [0, 0, 0, 0, 0, 1], atol=1e-6)
    assert err < 1e-6
    _, err_between = posthoc_coefficients(times, gammas, 300, gamma_of(0.07))
    assert 0 < err_between < 0.05


def test_reconstructing_a_tracked_sigma_rel_reproduces_it(tmp_path):
    traj = trajectory(300)
    ema = track(traj, [0.05, 0.10], tmp_path, every=25)
    assert [s.step for s in list_snapshots(tmp_path)] == list(range(25, 301, 25))
    for k, sigma in enumerate((0.05, 0.10)):
        rec = reconstruct(tmp_path, sigma)
        assert rec.step == 300 and rec.snapshots == 12 and rec.fit_error < 1e-6
        torch.testing.assert_close(rec.weights["w"], ema.weights(k)["w"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sigma, step", [(0.07, 0), (0.15, 0), (0.07, 150)])
def test_reconstruction_matches_the_directly_computed_power_ema(tmp_path, sigma, step):
    traj = trajectory(300, seed=1)
    track(traj, [0.05, 0.10], tmp_path, every=25)
    rec = reconstruct(tmp_path, sigma, step=step)
    end = step or 300
    direct = track(traj[:end], [sigma]).weights(0)["w"]
    # The rebuilt average is far closer to the direct one than the tracked profiles are to each other.
    tracked = track(traj[:end], [0.05, 0.10])
    spread = (tracked.weights(0)["w"] - tracked.weights(1)["w"]).norm()
    assert rec.step == end
    assert (rec.weights["w"] - direct).norm() < 0.05 * spread
    assert rec.fit_error < 0.1


def test_resumed_power_ema_equals_an_uninterrupted_one_and_refuses_other_widths():
    traj = trajectory(50)
    straight = track(traj, [0.05, 0.10])
    first = track(traj[:20], [0.05, 0.10])
    model = Vector(traj.shape[1])
    resumed = PowerEMA(model, (0.05, 0.10))
    resumed.load_state_dict(first.state_dict())
    for value in traj[20:]:
        model.w.data.copy_(value)
        resumed.update(model)
    for k in range(2):
        assert torch.equal(resumed.weights(k)["w"], straight.weights(k)["w"])
    with pytest.raises(ValueError, match="same --posthoc-ema.sigma-rels"):
        PowerEMA(model, (0.05, 0.12)).load_state_dict(first.state_dict())


def test_reconstruct_without_snapshots_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="snapshot-every"):
        reconstruct(tmp_path, 0.1)
    track(trajectory(20), [0.05, 0.10], tmp_path, every=10)
    with pytest.raises(ValueError, match=r"snapshots exist at steps \[10, 20\]"):
        reconstruct(tmp_path, 0.1, step=15)


def test_train_ldm_snapshots_resume_bitwise_and_the_command_writes_the_rebuilt_pipeline(
        captioned_images, tiny_autoencoder, tmp_path):
    import safetensors.torch

    from launch.posthoc_ema import main as posthoc_main
    from launch.train_ldm import main as train_main
    from ldm.pipeline import LatentDiffusionPipeline
    from tiny import sha256

    def args(out, *extra):
        return ["--preset", "tiny", "--data.source", str(captioned_images), "--vae", str(tiny_autoencoder),
                "--text-encoder", "minilm", "--run.output-dir", str(out), "--posthoc-ema.snapshot-every", "2",
                "--sample-every", "100", *extra]

    train_main(args(tmp_path / "straight"))
    train_main(args(tmp_path / "split", "--run.max-steps", "4"))
    train_main(args(tmp_path / "split"))  # resumes at step 4: the tracked averages come from the checkpoint
    names = lambda run: sorted(p.name for p in (run / "posthoc_ema").iterdir())
    assert names(tmp_path / "straight") == names(tmp_path / "split") == [
        f"snapshot_{s:08d}.safetensors" for s in (2, 4, 6, 8)]
    for s in (6, 8):
        name = f"posthoc_ema/snapshot_{s:08d}.safetensors"
        assert sha256(tmp_path / "straight" / name) == sha256(tmp_path / "split" / name)

    out = tmp_path / "rebuilt"
    posthoc_main(["--run", str(tmp_path / "straight"), "--sigma-rel", "0.10", "--out", str(out)])
    pipe = LatentDiffusionPipeline.from_pretrained(out)
    tracked = safetensors.torch.load_file(str(tmp_path / "straight" / "posthoc_ema" / "snapshot_00000008.safetensors"))
    for name, p in pipe.unet.named_parameters():
        torch.testing.assert_close(p.detach(), tracked[f"1/{name}"], rtol=1e-4, atol=1e-5)
    assert pipe.training_config["posthoc_ema"]["sigma_rel"] == 0.10 and pipe.training_config["posthoc_ema"]["step"] == 8
    assert pipe(["a red disc"], steps=2, guidance_scale=3.0, seed=0)[0].size == (32, 32)
    with pytest.raises(FileExistsError, match="--overwrite"):
        posthoc_main(["--run", str(tmp_path / "straight"), "--sigma-rel", "0.10", "--out", str(out)])


def test_training_ema_with_sigma_rel_is_the_power_profile_and_the_decay_caps_it():
    # --run.ema-sigma-rel: the run's own EMA weights steps like a power EMA of that width (the
    # initial weights get none), and ema_decay still caps the decay once the run is long.
    from launch.training.config import RunConfig
    from launch.training.ema import EMA

    steps, sigma = 40, 0.05
    model = Vector(steps)
    ema = EMA(model, decay=0.999999, sigma_rel=sigma)
    for value in torch.eye(steps):
        model.w.data.copy_(value)
        ema.update(model)
    np.testing.assert_allclose(ema.weights()["w"].numpy(), track(torch.eye(steps), [sigma]).weights(0)["w"].numpy(),
                               rtol=1e-4, atol=1e-7)
    one = Vector(1)
    capped, expected = EMA(one, decay=0.5, sigma_rel=sigma), 0.0
    for t in range(1, 101):
        one.w.data.fill_(float(t))
        capped.update(one)
        decay = min(0.5, (1 - 1 / t) ** (gamma_of(sigma) + 1))
        expected = decay * expected + (1 - decay) * t
    assert capped.weights()["w"].item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(99.0, abs=0.01)  # late steps: the 0.5 cap, not the profile (which would give ~97)
    with pytest.raises(ValueError, match="ema_sigma_rel"):
        RunConfig(ema_sigma_rel=0.3)
