"""``RunConfig``: the options every training run shares (``--run.*`` on both training commands)."""

from __future__ import annotations

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
    """LR after warmup: constant, cosine decay or linear decay to 0 at max_steps."""
    ema_decay: float = 0.999
    """0 disables EMA."""
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
