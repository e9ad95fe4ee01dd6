"""``RunConfig``: the options every training run shares (``--run.*`` on both training commands).

Every field is checked when the config is built (``__post_init__``), so a bad value stops the
command before anything is loaded, never inside the training loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class RunConfig:
    """Options every training run shares."""

    output_dir: Path = Path("runs/default")
    """Where checkpoints, metrics, pictures and the exported model go; rerunning resumes from it."""
    seed: int = 0
    """Seeds every random stream (weights, data order, noise, dropout), per process."""
    max_steps: int = 1000
    """Optimizer steps in total (a resumed run continues towards it)."""
    batch_size: int = 32
    """Per process, per micro-step."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum_steps x processes)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision of the trained model's forward/backward (weights stay fp32)."""
    max_grad_norm: float = 1.0
    """0 disables clipping (the norm is still computed to catch non-finite gradients)."""
    warmup_steps: int = 100
    """Linear LR warmup from 0 over this many steps."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """LR after warmup: constant, cosine decay or linear decay to 0 at max_steps (or lr_schedule_steps)."""
    lr_schedule_steps: int = 0
    """Step at which the cosine/linear decay reaches 0; 0: max_steps. For runs stopped early on purpose
    (a time budget, a sweep) that should follow a longer run's schedule."""
    ema_decay: float = 0.999
    """0 disables EMA."""
    ema_sigma_rel: float = 0.0
    """>0: the EMA's length is this fraction of the training so far (EDM2's power-function profile,
    e.g. 0.05), capped by ema_decay; 0: warm up as (1+t)/(10+t). For runs whose length is a time budget."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every this many steps (and at the end or when preempted)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted only after a newer one is complete."""
    log_every: int = 25
    """Reduce and log training metrics every this many steps."""
    max_skipped_steps: int = 20
    """Abort when more than this many steps in the last ``skip_window`` were non-finite."""
    skip_window: int = 200
    """Window (in steps) for max_skipped_steps."""
    num_workers: int = 2
    """Data-loader worker processes per training process."""
    eval_batch_size: int = 64
    """Batch size of validation, latent statistics and other no-gradient passes."""
    cpu: bool = False
    """Force the CPU even when a GPU is present (always on when none is)."""
    process_group_timeout_s: int = 1800
    """A rank that hangs longer than this in a collective ends the run."""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Tracker for metrics and sample grids (metrics.jsonl is always written)."""
    max_train_minutes: float = 0.0
    """Stop (checkpoint + final export) after this much training time in total; 0 means no limit."""
    crash_after_step: int = 0
    """Fault injection for resume tests: rank 0 SIGKILLs itself right after this step (0: never)."""
    allow_changes: tuple[str, ...] = ()
    """On resume, accept these changed fields (dotted name such as run.batch_size, last part such as lr, or all); recorded in config_history.jsonl."""

    def __post_init__(self) -> None:
        problems = run_config_problems(self)
        if problems:
            raise ValueError("Invalid --run options: " + "; ".join(problems) + ".")


def run_config_problems(run: RunConfig) -> list[str]:
    """Every out-of-range field of ``run``, as a fragment that says what is allowed."""
    out = [f"{name}={getattr(run, name)} must be at least {low}" for name, low in _INT_MINIMUMS.items()
           if not isinstance(getattr(run, name), int) or getattr(run, name) < low]
    for name in ("max_grad_norm", "max_train_minutes"):
        value = getattr(run, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            out.append(f"{name}={value} must be a finite number >= 0 (0: off)")
    if not (isinstance(run.ema_decay, (int, float)) and 0.0 <= run.ema_decay < 1.0):
        out.append(f"ema_decay={run.ema_decay} must be in [0, 1) (0: no EMA)")
    if isinstance(run.lr_schedule_steps, int) and 0 < run.lr_schedule_steps < run.max_steps:
        out.append(f"lr_schedule_steps={run.lr_schedule_steps} must be 0 or at least max_steps={run.max_steps} (past its "
                   "end a cosine schedule would raise the LR again)")
    if not (isinstance(run.ema_sigma_rel, (int, float)) and 0.0 <= run.ema_sigma_rel < 0.28):
        out.append(f"ema_sigma_rel={run.ema_sigma_rel} must be in [0, 0.28) (0: the (1+t)/(10+t) warmup)")
    for name, allowed in (("mixed_precision", ("no", "fp16", "bf16")), ("lr_schedule", ("constant", "cosine", "linear")),
                          ("report_to", ("tensorboard", "wandb", "none"))):
        if getattr(run, name) not in allowed:
            out.append(f"{name}={getattr(run, name)!r} must be one of {', '.join(allowed)}")
    return out


_INT_MINIMUMS = {
    "max_steps": 1, "batch_size": 1, "grad_accum_steps": 1, "warmup_steps": 0, "checkpoint_every": 1, "keep_last": 1,
    "log_every": 1, "max_skipped_steps": 0, "skip_window": 1, "num_workers": 0, "eval_batch_size": 1,
    "process_group_timeout_s": 1, "crash_after_step": 0, "lr_schedule_steps": 0,
}


def optimizer_problems(lr: float, adam_betas: tuple[float, ...], weight_decay: float) -> list[str]:
    """Out-of-range AdamW settings of a training command, as fragments that say what is allowed."""
    out = []
    if not (math.isfinite(lr) and lr > 0):
        out.append(f"lr={lr} must be a positive number")
    if len(adam_betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in adam_betas):
        out.append(f"adam_betas={tuple(adam_betas)} must be two numbers in [0, 1)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        out.append(f"weight_decay={weight_decay} must be a finite number >= 0")
    return out


def below(obj: object, low: int, *names: str) -> list[str]:
    """``name=value must be at least low`` for each named integer field of ``obj`` under ``low``."""
    return [f"{n}={getattr(obj, n)} must be at least {low}" for n in names if getattr(obj, n) < low]
