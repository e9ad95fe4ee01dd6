"""Optimizer and random-generator state as safetensors + JSON, never pickle (checkpoint.py writes them)."""

from __future__ import annotations

import base64
from typing import Any

import torch


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into safetensors-ready tensors and a JSON-ready rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def match_parameter_layouts(opt: torch.optim.Optimizer) -> None:
    """Lay each loaded optimizer state tensor out like its parameter. Checkpoints store dense tensors,
    so a channels-last UNet's Adam moments come back contiguous; kept that way, the fused AdamW (which
    walks every tensor in memory order) would pair each weight with another element's moments."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def generator_state(g: torch.Generator) -> dict[str, str]:
    return {"device": str(g.device), "state": base64.b64encode(g.get_state().numpy().tobytes()).decode()}


def restore_generator(g: torch.Generator, saved: dict[str, str]) -> None:
    raw = base64.b64decode(saved["state"])
    g.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def global_rng_state() -> dict[str, Any]:
    # We draw nothing from the global RNG ourselves, but libraries might (dropout, init);
    # restoring it too costs nothing and removes a source of divergence.
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def restore_global_rng(saved: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(saved["torch"])), dtype=torch.uint8))
    if "cuda" in saved and torch.cuda.is_available():
        cuda = torch.frombuffer(bytearray(base64.b64decode(saved["cuda"])), dtype=torch.uint8)
        torch.cuda.set_rng_state(cuda)
