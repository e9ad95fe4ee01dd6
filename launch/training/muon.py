"""Muon for the UNet's weight matrices and convolution kernels, AdamW for everything else.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable for LLM training") replaces each hidden
weight's update by the nearest semi-orthogonal matrix to its Nesterov momentum, computed with a few
Newton-Schulz iterations. A convolution kernel [out, in, kh, kw] is treated as the matrix
[out, in*kh*kw]. ``torch.optim.Muon`` takes 2-D parameters only, which would leave a UNet's
convolutions (most of its weights) to AdamW, hence this small optimizer.

The update is scaled by 0.2 * sqrt(max(rows, cols)) so its RMS matches AdamW's (Liu et al.): the same
learning rate and weight decay serve both kinds of parameters, and the LR schedule scales both.
Biases, norms, ``conv_in`` and ``conv_out`` stay on AdamW, as the papers keep the first and last layers,
and so do LoRA adapters.
The state is plain tensors (``momentum_buffer`` beside AdamW's moments), so checkpoints and exact resume
work as for AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# The quintic Newton-Schulz coefficients of Jordan et al.: they push every singular value of the
# normalised matrix into roughly [0.7, 1.2] in 5 steps, which is as orthogonal as the update needs.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EDGE_LAYERS = ("conv_in.", "conv_out.")


def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately semi-orthogonal matrices with the singular vectors of ``g`` ([rows, cols] or a batch
    [n, rows, cols] of equal shape)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # every singular value <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def muon_parameters(named: Iterable[tuple[str, torch.nn.Parameter]]) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon's, AdamW's) trainable parameters: weights with 2+ dimensions outside the first and last layer go to
    Muon; LoRA's low-rank factors (peft's ``lora_A``/``lora_B``) to AdamW, since Muon's update is meant for whole matrices."""
    muon, adamw = [], []
    for name, p in named:
        if p.requires_grad:
            whole_matrix = p.ndim >= 2 and not name.startswith(EDGE_LAYERS) and ".lora_" not in name
            (muon if whole_matrix else adamw).append(p)
    return muon, adamw


class MuonAdamW(torch.optim.AdamW):
    """AdamW whose parameter groups marked ``muon=True`` are stepped by Muon instead."""

    def __init__(self, muon_params: list[torch.nn.Parameter], adamw_params: list[torch.nn.Parameter], *, lr: float,
                 betas: tuple[float, float], weight_decay: float, momentum: float = 0.95, ns_steps: int = 5,
                 fused: bool | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum={momentum} must be in [0, 1)")
        groups = [{"params": muon_params, "muon": True, "momentum": momentum, "ns_steps": ns_steps},
                  {"params": adamw_params, "muon": False, "momentum": momentum, "ns_steps": ns_steps}]
        super().__init__([g for g in groups if g["params"]], lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
        # Fused AdamW lets an fp16 GradScaler hand it still-scaled gradients to unscale inside its kernel;
        # Muon's momentum must see unscaled ones, so the scaler unscales every gradient first.
        self._step_supports_amp_scaling = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        everything = self.param_groups
        try:  # AdamW steps the other groups; it walks self.param_groups, so show it only those
            self.param_groups = [g for g in everything if not g["muon"]]
            if self.param_groups:
                super().step()
        finally:
            self.param_groups = everything
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                # "step" too, which AdamW's load_state_dict expects of every parameter's state
                self.state[p].update(step=torch.tensor(0.0), momentum_buffer=torch.zeros_like(p, memory_format=torch.preserve_format))
            self.state[p]["step"] += 1
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - mom)
        nesterov = torch._foreach_lerp(grads, bufs, mom)
        # Matrices of one shape are orthogonalised as one batch: a UNet has ~20 shapes over ~130 weights,
        # and one small matmul per weight would cost more in overhead than in arithmetic.
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault((p.shape[0], p.numel() // p.shape[0]), []).append(i)
        updates: list[torch.Tensor] = [torch.empty(0)] * len(params)
        for (rows, cols), idx in by_shape.items():
            batch = orthogonalise(torch.stack([nesterov[i].reshape(rows, cols) for i in idx]), group["ns_steps"])
            batch.mul_(-lr * 0.2 * max(rows, cols) ** 0.5)
            for k, i in enumerate(idx):
                updates[i] = batch[k].view(params[i].shape)
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, updates)
