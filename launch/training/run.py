"""``TrainingRun``: the one object that owns a training run's life cycle.

Both training scripts build their models and a ``TrainState``, hand it to a ``TrainingRun``, then
call it explicitly, top to bottom (EDM2's ``training_loop.py`` reads this way; there are no
callbacks)::

    tr = TrainingRun(acc, cfg.run, state, what="stage 3: UNet", config=to_dict(cfg), stages={...})
    while tr.running:
        logs, applied = train_step(..., tr.guard, tr.step)
        ...                                   # the stage's own lines: schedules, EMA
        tr.end_step(logs)
        tr.log_training(lr=..., show="loss")
        if tr.evaluation_due(cfg.val_every): ...  # validation, sample grids (not just before the end's)
        tr.save_checkpoint_if_due()
    tr.end_loop(raw_model, "UNet")
    if tr.preempted:
        tr.exit_preempted()                   # SystemExit(143) after saving: rerun to resume
    ...                                       # export
    tr.close()

On resume it first compares the rerun's config and stage fingerprints with the ones saved in the
checkpoint (``resume_check``: refused, applied and logged, or applied only with
``--run.allow-changes``), before any weight is loaded; ``config.json`` is written on a fresh start
only, later accepted changes go to ``config_history.jsonl``. It owns: the resume banner, the step guard (non-finite skips, preemption, the time budget), the
training clock carried over resumes, the metrics logger and progress bar, the cadence of logging
and checkpoints, fault injection for the resume tests, and the end of the run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from foundation import write_json_atomic
from launch.training import run_lock
from launch.training.accelerator import check_ranks_in_sync
from launch.training.checkpoint import CheckpointError, CheckpointManager, TrainState
from launch.training.config import RunConfig
from launch.training.guard import PreemptionFlag, StepGuard
from launch.training.resume_check import (ResumeDecision, ResumeRefused, append_history, check_record, normalise,
                                          remember_hyperparameters, restore_hyperparameters)
from launch.training.tracking import MetricsLogger, accumulate_logs, progress_bar, reduce_logs

FINISHED_MARKER = "finished.json"
_REPORTED: set[str] = set()  # damaged-checkpoint messages already printed by this process


class TrainingRun:
    """Resume, guard, clock, logging, progress, cadence, checkpoints and the end of one run."""

    def __init__(self, accelerator, run: RunConfig, state: TrainState, *, what: str, config: dict[str, Any],
                 stages: dict[str, Any] | None = None):
        """``config``: the resolved config (``to_dict(cfg)``); ``stages``: {name: JSON-ready fingerprint}
        of what the checkpoint's meaning depends on besides the config (frozen stages, model shape)."""
        self.acc, self.cfg, self.state, self.what = accelerator, run, state, what
        self.out = Path(run.output_dir)
        state.counters.setdefault("train_seconds", 0)
        state.counters.setdefault("skipped", 0)
        self.checkpoints, path, decision = _plan_resume(accelerator, run, config, stages)
        self.resumed_from = self._resume(path, decision, state, config)
        accelerator.print(f"resumed from {self.resumed_from} at step {state.step}" if self.resumed_from
                          else f"fresh run -> {self.out}")
        self.guard = StepGuard(accelerator, run, PreemptionFlag())
        self.guard.total_skipped = state.counters["skipped"]
        self.guard.start_clock(run, state.counters["train_seconds"])
        self.logger = MetricsLogger(accelerator, self.out, run.report_to, self.out.name, config)
        if self.resumed_from is not None:
            self.logger.forget_after(state.step)  # steps logged after the checkpoint are trained again
        self.bar = progress_bar(accelerator, state.step, run.max_steps, what)
        self._data = state.per_rank.get("data")  # the loader, for its per-source counts and buckets
        if getattr(self._data, "bucket_histogram", None):
            accelerator.print(f"samples per bucket on this process: {self._data.bucket_histogram}")
        self.last = False  # the step just ended is the run's last (max_steps or time budget reached)
        self._sums: dict[str, torch.Tensor] = {}
        self._t_start, self._step0 = time.time(), state.step
        self._t0 = self._t_start - state.counters["train_seconds"]  # training time carries over a resume

    def _resume(self, path: Path | None, decision: ResumeDecision, state: TrainState, config: dict[str, Any]) -> Path | None:
        """Fresh run: write config.json. Resume: load ``path``, keep the new hyperparameters, log the changes."""
        if path is None:
            if self.acc.is_main_process:
                write_json_atomic(self.out / "config.json", config)
            return None
        remembered = remember_hyperparameters(state.optimizers)
        try:
            self.checkpoints.load(path, state)
        except CheckpointError as e:
            _refuse(self.acc, str(e), self.out)
        restore_hyperparameters(state.optimizers, state.shared.values(), remembered)
        if state.step >= self.cfg.max_steps:
            self.acc.print(f"warning: {path.name} is at step {state.step}, already at or past --run.max-steps "
                           f"{self.cfg.max_steps}: nothing is trained, the checkpoint's weights are exported as they are")
        for change in decision.applied:
            self.acc.print(f"changed since {path.name}: {change.describe()}")
        if self.acc.is_main_process:
            append_history(self.out, state.step, path.name, decision)
        return path

    # -- the loop ---------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def running(self) -> bool:
        """Another step is due: below max_steps, within the time budget, not preempted."""
        return self.state.step < self.cfg.max_steps and not self.last and not self.guard.stop_requested

    @property
    def images_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum_steps * self.acc.num_processes

    def end_step(self, logs: dict[str, torch.Tensor]) -> None:
        """Count the step just taken (applied or skipped): counters, clock, progress, log sums."""
        counters = self.state.counters
        counters["skipped"] = self.guard.total_skipped
        self.state.step += 1
        counters["train_seconds"] = round(time.time() - self._t0, 3)
        self.bar.update(1)
        accumulate_logs(self._sums, logs)
        self.last = self.state.step >= self.cfg.max_steps or self.guard.time_up

    def due(self, every: int) -> bool:
        """True every ``every`` steps and at the last step."""
        return self.state.step % every == 0 or self.last

    def evaluation_due(self, every: int) -> bool:
        """``due(every)``, less a periodic evaluation that the last step's would repeat within half an
        interval (e.g. held-out loss at step 600 of a time budget that ends at 607): that work would
        only take training time from the budget. Every rank decides the same (``steps_left``)."""
        if not self.due(every):
            return False
        return self.last or self.steps_left() >= every / 2

    def steps_left(self) -> float:
        """Steps expected before the run ends: up to max_steps, or fewer when the time budget's seconds left,
        at this session's mean seconds per step (evaluation included), run out first. Identical on every rank."""
        by_steps = float(self.cfg.max_steps - self.state.step)
        done = self.state.step - self._step0
        if not math.isfinite(self.guard.seconds_left) or done < 1:
            return by_steps
        return min(by_steps, self.guard.seconds_left * done / max(self.guard.seconds_elapsed, 1e-9))

    def log_training(self, lr: float, show: str) -> dict[str, float] | None:
        """At the log cadence: reduce the summed logs over steps and ranks, write them, show ``show``."""
        if not self.due(self.cfg.log_every):
            return None
        speed = (self.state.step - self._step0) * self.images_per_step / (time.time() - self._t_start)
        row = reduce_logs(self.acc, self._sums, lr=lr, images_per_s=speed, skipped_steps=self.state.counters["skipped"],
                          **self._samples_per_source())
        self.logger.log(self.state.step, row)
        self.bar.set_postfix({show: f"{row.get(show, math.nan):.4f}"})
        return row

    def _samples_per_source(self) -> dict[str, float]:
        """With several --data sources: samples each has contributed so far, summed over processes."""
        counts = getattr(self._data, "source_sample_counts", None) or {}
        if len(counts) < 2:
            return {}
        names = sorted(counts)
        local = torch.tensor([float(counts[n]) for n in names], device=self.acc.device)
        total = self.acc.reduce(local, reduction="sum").tolist()
        return {f"samples[{n}]": v for n, v in zip(names, total)}

    def log_validation(self, scores: dict[str, float], message: str) -> None:
        """Validation numbers (main process; empty elsewhere) to the logger and under the bar."""
        if scores:
            self.logger.log(self.state.step, scores, kind="val")
            self.bar.write(f"step {self.state.step}: {message}")

    def log_image(self, tag: str, path: Path | None) -> None:
        if path is not None:
            self.logger.log_image(self.state.step, tag, path)

    def save_checkpoint_if_due(self) -> None:
        """Checkpoint on schedule, at the last step, or when preempted; then the fault injection."""
        if self.guard.stop_requested or self.last or self.state.step % self.cfg.checkpoint_every == 0:
            self.checkpoints.save(self.state)
        if self.cfg.crash_after_step and self.state.step == self.cfg.crash_after_step and self.acc.is_main_process:
            os.kill(os.getpid(), signal.SIGKILL)  # the resume tests' kill between checkpoints

    # -- the end ----------------------------------------------------------------------------------

    def end_loop(self, module: torch.nn.Module, what: str) -> None:
        """Close the progress bar and check every rank holds the same weights."""
        self.bar.close()
        check_ranks_in_sync(self.acc, module, what)

    @property
    def preempted(self) -> bool:
        return self.guard.stop_requested

    def exit_preempted(self) -> NoReturn:
        """The checkpoint is saved: say how to resume and exit non-zero (128 + SIGTERM)."""
        self.acc.print(f"stopped by {self.guard.preemption.signal_name} at step {self.state.step}; "
                       "rerun the same command to resume")
        self.close()
        raise SystemExit(143)

    def mark_finished(self, folder: Path) -> None:
        """On the main process: the exported ``folder`` is complete for this step/time budget."""
        if self.acc.is_main_process:
            mark_finished(folder, self.state.step, self.state.counters["train_seconds"])

    def close(self) -> None:
        self.logger.close()
        run_lock.release(self.out)
        self.acc.end_training()  # tear gloo/NCCL down now: left to interpreter exit it can abort a rank


def check_resume(accelerator, run: RunConfig, *, config: dict[str, Any], stages: dict[str, Any] | None = None) -> None:
    """The resume check alone, to call before anything costly or stateful (a latent cache) is set up.

    ``TrainingRun`` repeats it (without hashing the checkpoint again); this only refuses earlier.
    """
    _plan_resume(accelerator, run, config, stages)


def _plan_resume(accelerator, run: RunConfig, config: dict[str, Any], stages: dict[str, Any] | None):
    """(manager with this run's record set, newest good checkpoint or None, decision); refuses with ``ResumeRefused``."""
    out = Path(run.output_dir)
    if accelerator.is_main_process:
        run_lock.acquire(out)  # held until close(): a second launch into this folder is refused
    current = {"config": normalise(config), "stages": normalise(stages or {})}
    checkpoints = CheckpointManager(out / "checkpoints", accelerator, keep_last=run.keep_last)
    checkpoints.record = current
    try:
        path = checkpoints.latest_valid()
        for reason in checkpoints.skipped:
            if reason not in _REPORTED:  # check_resume and TrainingRun both look: say it once
                _REPORTED.add(reason)
                accelerator.print(f"skipping damaged checkpoint: {reason}")
        if path is None:
            return checkpoints, None, ResumeDecision()
        recorded = checkpoints.read_record(path)
    except CheckpointError as e:
        _refuse(accelerator, str(e), out)
    if recorded is None:  # a checkpoint from before records existed: config.json is the best witness
        try:
            legacy = json.loads((out / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            legacy = None
        recorded = {"config": legacy, "stages": {}} if isinstance(legacy, dict) else None
    try:
        decision, warnings = check_record(recorded, current, run.allow_changes, out, path.name)
    except ResumeRefused as e:
        _refuse(accelerator, e.message, out)
    for warning in warnings:
        accelerator.print(f"warning: {warning}")
    return checkpoints, path, decision


def _refuse(accelerator, message: str, run_dir: Path | None = None) -> NoReturn:
    """End the process group, then exit 1 with ``message`` (no traceback: it is the user's to act on)."""
    if run_dir is not None:
        run_lock.release(run_dir)
    accelerator.end_training()
    raise ResumeRefused(message)


def mark_finished(folder: Path, step: int, train_seconds: float) -> None:
    """Written last into a run's exported model: its presence means the export is complete."""
    write_json_atomic(Path(folder) / FINISHED_MARKER, {"step": step, "train_seconds": train_seconds})


def run_finished(folder: Path, run: RunConfig) -> bool:
    """True when ``folder`` holds a complete export that satisfies ``run``'s step or time budget.

    Rerunning with a larger ``max_steps`` or ``max_train_minutes`` is not finished: it resumes.
    """
    marker = Path(folder) / FINISHED_MARKER
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
        step, seconds = int(done["step"]), float(done["train_seconds"])
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        return False  # a damaged marker proves nothing: resume, which exports again
    if step >= run.max_steps:
        return True
    return run.max_train_minutes > 0 and seconds >= run.max_train_minutes * 60


def already_finished(accelerator, folder: Path, run: RunConfig) -> bool:
    """When ``folder`` is complete for this budget: say so, end the process group, return True."""
    if not run_finished(folder, run):
        return False
    accelerator.print(f"{folder} is complete for this step/time budget; nothing to do.")
    accelerator.end_training()
    return True
