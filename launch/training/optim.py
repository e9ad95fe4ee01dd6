"""LR schedules and the grad scaler's checkpointable state."""

from __future__ import annotations

from typing import Any

import torch

from launch.training.config import RunConfig


def make_unet_optimizer(unet: torch.nn.Module, kind: str, *, lr: float, betas: tuple[float, float], weight_decay: float,
                        muon_momentum: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the UNet's trainable parameters, or Muon for its weight matrices and kernels with AdamW for the rest."""
    # The fused kernel: 1.05x the mini UNet's step at 2 threads on a CPU (unet_cpu_options).
    fused = device.type in ("cuda", "cpu")
    if kind == "muon":
        from launch.training.muon import MuonAdamW, muon_parameters

        matrices, rest = muon_parameters(unet.named_parameters())
        return MuonAdamW(matrices, rest, lr=lr, betas=betas, weight_decay=weight_decay, momentum=muon_momentum, fused=fused)
    return torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr, betas=betas,
                             weight_decay=weight_decay, fused=fused)


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
