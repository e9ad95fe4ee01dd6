"""Exponential moving average of the trained weights, and the one place that builds an EMA copy."""

from __future__ import annotations

import copy

import torch


class EMA(torch.nn.Module):
    """Exponential moving average of a model's parameters, with warmup.

    decay_t = min(decay, (1 + t) / (10 + t)): early averages are not dominated by the random
    initialisation. It is a Module so its shadow weights checkpoint as safetensors like any other.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for i, n in enumerate(self.names):
            self.register_buffer(f"p{i}", params[n].detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._t: int | None = None  # host copy of num_updates, so update() never syncs a GPU

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._t = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _shadow(self) -> list[torch.Tensor]:
        return [getattr(self, f"p{i}") for i in range(len(self.names))]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self._t is None:
            self._t = int(self.num_updates)
        self._t += 1
        self.num_updates.fill_(self._t)
        t = self._t
        decay = min(self.decay, (1 + t) / (10 + t))
        params = dict(model.named_parameters())
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(self._shadow(), current, 1.0 - decay)

    def weights(self) -> dict[str, torch.Tensor]:
        """{parameter name: averaged value} (float32)."""
        return dict(zip(self.names, self._shadow()))

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, shadow in zip(self.names, self._shadow()):
            params[n].copy_(shadow.to(params[n].dtype))


@torch.no_grad()
def averaged_copy(model: torch.nn.Module, ema: EMA | None, into: torch.nn.Module | None = None) -> torch.nn.Module:
    """An eval-mode copy of ``model`` holding the EMA weights (``model``'s own when ``ema`` is None).

    Pass the previous result as ``into`` to refill it in place instead of allocating another copy
    (validation does this every few hundred steps). ``model`` itself is never changed.
    """
    if into is None:
        into = copy.deepcopy(model).eval()
    else:
        into.load_state_dict(model.state_dict())
    if ema is not None:
        ema.copy_to(into)
    return into
