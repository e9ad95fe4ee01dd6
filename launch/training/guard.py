"""Preemption signals and the all-rank decision to apply or skip a step (RELIABILITY.md)."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections import deque
from typing import Any

import torch

from launch.training.config import RunConfig

log = logging.getLogger(__name__)


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; ``StepGuard`` shares it with every rank at the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.raised = False
        self.signal_name = ""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True
        self.signal_name = signal.Signals(signum).name


class TooManySkippedSteps(RuntimeError):
    pass


class StepGuard:
    """Decides, identically on every rank, whether to apply a step and whether to stop.

    One small all-reduce per optimizer step carries two flags: "this step's gradient norm was not
    finite" and "a preemption signal arrived here". The DDP all-reduce already makes gradients
    (and so their norm) identical across ranks, but a rank-local decision would still deadlock if
    anything differed, so the decision is made on the reduced flags.
    """

    def __init__(self, accelerator, run: RunConfig, preemption: PreemptionFlag):
        self.accelerator = accelerator
        self.preemption = preemption
        self.deadline = math.inf  # wall-clock end of the training-time budget
        self.time_up = False  # set by check(), identical on every rank
        self.clock_start = time.time()  # when this process's clock was armed (start_clock)
        # Set by check(), identical on every rank (means over ranks of the all-reduced clocks): seconds
        # since start_clock and seconds of the budget left (inf without one). What a time-capped run
        # uses to foresee its end (TrainingRun.evaluation_due) without a rank deciding alone.
        self.seconds_elapsed = 0.0
        self.seconds_left = math.inf
        self.stop_requested = False  # a preemption signal reached some rank (set by check())
        self.max_skipped = run.max_skipped_steps
        self.recent_skips: deque[int] = deque()
        self.window = run.skip_window
        self.total_skipped = 0

    def start_clock(self, run: RunConfig, train_seconds_so_far: float) -> None:
        """Arm the ``max_train_minutes`` budget (training time carries over resumes)."""
        self.clock_start = time.time()
        if run.max_train_minutes > 0:
            self.deadline = self.clock_start + run.max_train_minutes * 60 - train_seconds_so_far

    def check(self, grad_norm: torch.Tensor | None, step: int) -> tuple[bool, bool]:
        """Return (apply_this_step, stop_now). Call after clipping, before ``optimizer.step``.

        Also agrees on whether the time budget is spent (``self.time_up``): clocks differ between
        processes, and one rank ending the loop a step early would deadlock the others.
        """
        device = self.accelerator.device
        bad = torch.zeros((), device=device) if grad_norm is None else (~torch.isfinite(grad_norm)).float()
        now = time.time()
        budgeted = math.isfinite(self.deadline)
        local = [float(self.preemption.raised), float(now >= self.deadline), now - self.clock_start,
                 max(0.0, self.deadline - now) if budgeted else 0.0]
        # Relative clocks stay small, so float32 keeps them to well under a second (float64 is not on every device).
        flags = torch.cat([bad.reshape(1).to(device), torch.tensor(local, device=device)])
        flags = self.accelerator.reduce(flags, reduction="sum").tolist()
        skip, stop, self.time_up = (bool(v > 0) for v in flags[:3])
        ranks = getattr(self.accelerator, "num_processes", 1)
        self.seconds_elapsed = flags[3] / ranks
        self.seconds_left = flags[4] / ranks if budgeted else math.inf
        self.stop_requested = self.stop_requested or stop
        if skip:
            self._count_skip(step)
        return not skip, stop

    def _count_skip(self, step: int) -> None:
        self.total_skipped += 1
        self.recent_skips.append(step)
        while self.recent_skips and self.recent_skips[0] <= step - self.window:
            self.recent_skips.popleft()
        log.warning("step %d: non-finite loss or gradient on some process; skipped on all (%d so far)", step, self.total_skipped)
        if len(self.recent_skips) > self.max_skipped:
            raise TooManySkippedSteps(
                f"{len(self.recent_skips)} of the last {self.window} steps had non-finite losses or gradients "
                f"(limit {self.max_skipped}). The run is diverging: lower the learning rate, enable gradient "
                "clipping (--run.max-grad-norm 1.0), use bf16 rather than fp16, or check the data for broken samples."
            )
