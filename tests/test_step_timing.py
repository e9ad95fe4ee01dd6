"""launch/training/step_timing.py and the demo's stage-3 plan built on it."""

from __future__ import annotations

import pytest
from diffusers import AutoencoderKL

from launch.demo import LOOP_OVERHEAD, STAGE3_EXTRA_MINUTES, DemoConfig, stage3_minutes, stage3_steps
from launch.training.step_timing import cache_seconds_per_image, unet_step_seconds
from ldm.unet import UNET_PRESETS


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_unet_step_seconds_times_a_real_training_step_with_train_ldms_optimizer(optimizer, monkeypatch):
    from launch.training.muon import MuonAdamW

    steps = []
    original = MuonAdamW._muon_step
    monkeypatch.setattr(MuonAdamW, "_muon_step", lambda self, group: (steps.append(1), original(self, group))[1])
    seconds = unet_step_seconds(UNET_PRESETS["tiny"], text_width=16, text_tokens=5, latent_channels=4, latent_size=8,
                                batch_size=2, optimizer=optimizer, steps=2, warmup=1)
    assert 0 < seconds < 30
    assert len(steps) == (3 if optimizer == "muon" else 0)  # the timed optimizer is the one the run will use


class CountingTextEncoder:
    def __init__(self):
        self.calls = []

    def encode(self, captions):
        self.calls.append(len(captions))


def test_cache_seconds_per_image_encodes_both_views_and_the_captions():
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    seen = []
    original = vae.encode
    vae.encode = lambda x: (seen.append(tuple(x.shape)), original(x))[1]
    te = CountingTextEncoder()
    per_image = cache_seconds_per_image(vae, te, resolution=16, flip=True, batch_size=3, rounds=1)
    assert per_image > 0
    assert seen == [(6, 3, 16, 16)] * 2  # warm-up + one round, each the images and their mirrors
    assert te.calls == [3, 3]
    seen.clear()
    cache_seconds_per_image(vae, None, resolution=16, flip=False, batch_size=3, rounds=1)
    assert seen == [(3, 3, 16, 16)] * 2


def test_stage3_steps_fill_the_minutes_unless_a_run_already_chose():
    plan = {"step_seconds": 0.3, "cache_minutes": 1.0, "resumed_steps": 0}
    steps = stage3_steps(plan, 7.0)
    assert steps == int(7.0 * 60 / (0.3 * LOOP_OVERHEAD))
    assert stage3_steps({**plan, "step_seconds": 0.6}, 7.0) in (steps // 2, steps // 2 + 1)  # a CPU half as fast
    assert stage3_steps({**plan, "step_seconds": 100.0}, 1.0) == 100  # never fewer than 100
    assert stage3_steps({**plan, "resumed_steps": 3450}, 7.0) == 3450  # a rerun keeps its schedule


def test_stage3_minutes_fill_what_is_left_of_the_cpu_budget():
    cfg = DemoConfig()
    fast = stage3_minutes(cfg, gpu=False, spent_minutes=3.0, cache_minutes=0.3)  # an AMX CPU: stage 1 in ~3 min
    assert fast == 15.0 - 3.0 - 0.3 - STAGE3_EXTRA_MINUTES  # no fixed cap leaves minutes unused
    slow = stage3_minutes(cfg, gpu=False, spent_minutes=5.3, cache_minutes=0.9)  # an AVX2 CPU
    assert slow == 15.0 - 5.3 - 0.9 - STAGE3_EXTRA_MINUTES < fast
    # Every stage together stays within the total, down to a floor of one minute of training.
    assert 5.3 + 0.9 + slow + STAGE3_EXTRA_MINUTES <= cfg.cpu_total_minutes + 1e-9
    assert stage3_minutes(cfg, gpu=False, spent_minutes=20.0, cache_minutes=1.0) == 1.0
    assert stage3_minutes(DemoConfig(cpu_total_minutes=30.0), gpu=False, spent_minutes=3.0, cache_minutes=0.0) > fast
    assert stage3_minutes(DemoConfig(ldm_minutes=2.5), gpu=False, spent_minutes=3.0, cache_minutes=0.3) == 2.5
    assert stage3_minutes(cfg, gpu=True, spent_minutes=30.0, cache_minutes=0.0) == 60.0
