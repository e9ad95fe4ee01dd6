"""LR schedules and the grad scaler's checkpointable state."""

from __future__ import annotations

from typing import Any

import torch

from launch.training.config import RunConfig


def make_lr_schedule(optimizer: torch.optim.Optimizer, run: RunConfig):
    """Warmup then constant / cosine / linear decay, from diffusers (its state_dict is JSON-ready)."""
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[run.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=run.warmup_steps, num_training_steps=run.lr_schedule_steps or run.max_steps)


class GradScalerState:
    """Adapter so accelerate's fp16 grad scaler (or None) checkpoints as JSON."""

    def __init__(self, accelerator):
        self.scaler = accelerator.scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
