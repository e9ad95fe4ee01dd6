"""Step guard, EMA, generators and the config command line."""

from __future__ import annotations

import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from launch.training.accelerator import make_generators
from launch.training.checkpoint import TrainState
from launch.training.config import RunConfig
from launch.training.ema import EMA
from launch.training.guard import PreemptionFlag, StepGuard, TooManySkippedSteps
from launch.training.run import TrainingRun
from ldm.cli import ConfigError, parse_config, save_config


class OneProcess:
    device = torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        return tensor


def test_non_finite_steps_are_skipped_then_abort():
    guard = StepGuard(OneProcess(), RunConfig(max_skipped_steps=2, skip_window=10), PreemptionFlag())
    assert guard.check(torch.tensor(1.5), step=0) == (True, False)
    assert guard.check(torch.tensor(float("nan")), step=1) == (False, False)
    assert guard.check(torch.tensor(float("inf")), step=2) == (False, False)
    with pytest.raises(TooManySkippedSteps, match="learning rate"):
        guard.check(torch.tensor(float("nan")), step=3)


def test_skips_outside_the_window_are_forgotten():
    guard = StepGuard(OneProcess(), RunConfig(max_skipped_steps=1, skip_window=5), PreemptionFlag())
    guard.check(torch.tensor(float("nan")), step=0)
    guard.check(torch.tensor(float("nan")), step=10)  # the first skip left the window
    assert guard.total_skipped == 2


def test_sigterm_sets_the_stop_flag():
    flag = PreemptionFlag()
    guard = StepGuard(OneProcess(), RunConfig(), flag)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.check(torch.tensor(1.0), step=0) == (True, True)
    assert flag.signal_name == "SIGTERM"
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_ema_warmup_and_copy():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # t=1: decay = min(0.99, 2/11)
    expected = 1.0 - 2 / 11
    target = torch.nn.Linear(3, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 3), expected))
    assert int(ema.num_updates) == 1


def test_generators_are_distinct_per_rank_and_name_and_reproducible():
    a = make_generators(7, 0, ["noise", "timesteps"])
    b = make_generators(7, 1, ["noise"])
    again = make_generators(7, 0, ["timesteps", "noise"])
    draws = {k: torch.rand(4, generator=g) for k, g in a.items()}
    assert not torch.equal(draws["noise"], torch.rand(4, generator=b["noise"]))
    assert not torch.equal(draws["noise"], draws["timesteps"])
    assert torch.equal(draws["noise"], torch.rand(4, generator=again["noise"]))


def test_cli_preset_config_file_and_overrides(tmp_path):
    presets = {"quick": RunConfig(max_steps=10, seed=3)}
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"seed": 5, "mixed_precision": "bf16"}))
    cfg = parse_config(RunConfig, presets, ["--preset", "quick", "--config", str(cfg_file), "--max-steps", "20"])
    assert (cfg.max_steps, cfg.seed, cfg.mixed_precision) == (20, 5, "bf16")

    save_config(cfg, tmp_path / "out" / "config.json")
    again = parse_config(RunConfig, None, ["--config", str(tmp_path / "out" / "config.json")])
    assert again == cfg


def test_cli_refuses_unknown_fields_and_presets(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"max_stepz": 3}))
    with pytest.raises(ConfigError, match="max_stepz"):
        parse_config(RunConfig, None, ["--config", str(bad)])
    with pytest.raises(ConfigError, match="unknown preset"):
        parse_config(RunConfig, {"a": RunConfig()}, ["--preset", "b"])


@pytest.mark.parametrize("marker", [b"\xff not utf-8", b"[1]", b'{"step": "x", "train_seconds": 1}', b"{}", b""])
def test_a_damaged_finished_marker_means_not_finished(tmp_path, marker):
    from launch.training.run import FINISHED_MARKER, mark_finished, run_finished

    mark_finished(tmp_path, 8, 12.5)
    assert run_finished(tmp_path, RunConfig(max_steps=8)) and not run_finished(tmp_path, RunConfig(max_steps=9))
    (tmp_path / FINISHED_MARKER).write_bytes(marker)
    assert not run_finished(tmp_path, RunConfig(max_steps=8))  # resumed and exported again, not a crash


class TwoProcessesOtherAt:
    """Rank 0 of two; the other rank's flags/clocks are ``other`` (what its all-reduce would add)."""

    device = torch.device("cpu")
    num_processes = 2

    def __init__(self, other: list[float]):
        self.other = torch.tensor(other)

    def reduce(self, tensor, reduction="sum"):
        return tensor + self.other


def test_the_guard_agrees_on_the_clocks_as_means_over_ranks():
    guard = StepGuard(TwoProcessesOtherAt([0, 0, 0, 30.0, 50.0]), RunConfig(max_train_minutes=1), PreemptionFlag())
    guard.start_clock(RunConfig(max_train_minutes=1), 20.0)  # 40 s of the 60 left, on this rank
    assert guard.check(torch.tensor(1.0), step=0) == (True, False)
    assert guard.seconds_elapsed == pytest.approx(15.0, abs=0.5)  # (~0 here + 30 there) / 2
    assert guard.seconds_left == pytest.approx(45.0, abs=0.5)  # (~40 here + 50 there) / 2
    unbudgeted = StepGuard(OneProcess(), RunConfig(), PreemptionFlag())
    unbudgeted.check(torch.tensor(1.0), step=0)
    assert unbudgeted.seconds_left == math.inf and not unbudgeted.time_up


def _run_at(step: int, *, max_steps: int, seconds_left: float = math.inf, seconds_elapsed: float = 0.0,
            step0: int = 0) -> TrainingRun:
    """A TrainingRun's cadence state alone (no accelerator, no files)."""
    tr = TrainingRun.__new__(TrainingRun)
    tr.cfg, tr.state, tr._step0 = RunConfig(max_steps=max_steps), TrainState(step=step), step0
    tr.guard = SimpleNamespace(seconds_left=seconds_left, seconds_elapsed=seconds_elapsed)
    tr.last = step >= max_steps
    return tr


def test_a_periodic_evaluation_the_end_would_repeat_soon_is_skipped():
    assert _run_at(400, max_steps=1000).evaluation_due(200)
    assert not _run_at(401, max_steps=1000).evaluation_due(200)  # not on the cadence at all
    assert not _run_at(1000, max_steps=1010).evaluation_due(200)  # 10 steps before the end's
    assert _run_at(1010, max_steps=1010).evaluation_due(200)  # the end's own
    # A time budget: 100 steps took 50 s and 4 s are left, so ~8 more steps, not the 900 max_steps allows.
    budget = dict(max_steps=1000, seconds_left=4.0, seconds_elapsed=50.0)
    assert _run_at(100, **budget).steps_left() == pytest.approx(8.0)
    assert not _run_at(100, **budget).evaluation_due(50)
    assert _run_at(100, **budget).evaluation_due(10)  # 8 steps left >= half of 10
    # After a resume at step 90 only this session's 10 steps (and 50 s) set the pace: 0.8 steps left.
    assert _run_at(100, **budget, step0=90).steps_left() == pytest.approx(0.8)
