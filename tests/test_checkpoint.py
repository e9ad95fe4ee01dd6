"""The checkpoint promises of RELIABILITY.md, on a tiny model in one process."""

from __future__ import annotations

import json
import os

import pytest
import torch

from launch.training.checkpoint import CheckpointError, CheckpointManager, TrainState, step_dir_name
from launch.training.accelerator import make_generators
from launch.training.config import RunConfig
from launch.training.ema import EMA
from launch.training.optim import make_lr_schedule


class OneProcess:
    process_index = 0
    num_processes = 1
    is_main_process = True
    device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass

    def reduce(self, tensor, reduction="sum"):
        return tensor


class Position:
    """Stands in for the data loader's JSON position."""

    def __init__(self) -> None:
        self.epoch, self.batch = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, s):
        self.epoch, self.batch = s["epoch"], s["batch"]


def make_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = make_lr_schedule(opt, RunConfig(warmup_steps=3, max_steps=50))
    return TrainState(
        modules={"model": model, "ema": EMA(model, 0.9)},
        optimizers={"opt": opt},
        shared={"lr": sched},
        generators=make_generators(seed, 0, ["noise", "dropout"]),
        per_rank={"data": Position()},
    )


def train_steps(state: TrainState, n: int) -> list[float]:
    model, opt = state.modules["model"], state.optimizers["opt"]
    losses = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=state.generators["noise"])
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state.shared["lr"].step()
        state.modules["ema"].update(model)
        state.per_rank["data"].batch += 1
        state.step += 1
        losses.append(loss.item())
    return losses


def test_resume_continues_bitwise_identically(tmp_path):
    straight = make_state()
    expected = train_steps(straight, 10)

    first = make_state()
    train_steps(first, 4)
    CheckpointManager(tmp_path, OneProcess()).save(first)

    resumed = make_state(seed=123)  # different init: everything must come from the checkpoint
    path = CheckpointManager(tmp_path, OneProcess()).resume(resumed)
    assert path is not None and path.name == step_dir_name(4)
    assert resumed.step == 4 and resumed.per_rank["data"].batch == 4
    assert train_steps(resumed, 6) == expected[4:]
    for a, b in zip(straight.modules["ema"].state_dict().values(), resumed.modules["ema"].state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.shared["lr"].get_last_lr() == straight.shared["lr"].get_last_lr()


def test_keep_last_rotates_only_after_a_complete_save(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, OneProcess(), keep_last=2)
    state = make_state()
    for _ in range(3):
        train_steps(state, 1)
        mgr.save(state)
    assert [p.name for p in mgr.complete_checkpoints()] == [step_dir_name(2), step_dir_name(3)]

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(CheckpointManager, "_write_shared_files", disk_full)
    train_steps(state, 1)
    with pytest.raises(OSError):
        mgr.save(state)
    assert [p.name for p in mgr.complete_checkpoints()] == [step_dir_name(2), step_dir_name(3)]
    assert mgr.latest_valid().name == step_dir_name(3)


def test_interrupted_save_is_never_chosen(tmp_path):
    mgr = CheckpointManager(tmp_path, OneProcess())
    state = make_state()
    train_steps(state, 2)
    mgr.save(state)
    # A writer killed between two files: a temp folder with some files, no manifest ...
    partial = tmp_path / f".tmp-{step_dir_name(3)}"
    partial.mkdir()
    (partial / "module-model.safetensors").write_bytes(b"\0" * 10)
    # ... and, worse, a step folder renamed by hand without its manifest.
    (tmp_path / step_dir_name(5)).mkdir()
    assert mgr.latest_valid().name == step_dir_name(2)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corruption_is_caught_and_resume_falls_back(tmp_path, damage):
    mgr = CheckpointManager(tmp_path, OneProcess(), keep_last=3)
    state = make_state()
    train_steps(state, 1)
    mgr.save(state)
    train_steps(state, 1)
    newest = mgr.save(state)
    weights = newest / "module-model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0x01  # inside the tensor bytes: safetensors would load this silently
    weights.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="module-model.safetensors"):
        mgr.verify(newest)
    fresh = make_state()
    assert mgr.resume(fresh).name == step_dir_name(1)
    assert fresh.step == 1


def test_resume_refuses_a_different_process_count(tmp_path):
    state = make_state()
    train_steps(state, 1)
    path = CheckpointManager(tmp_path, OneProcess()).save(state)
    shared = json.loads((path / "state.json").read_text())
    shared["world_size"] = 2
    (path / "state.json").write_text(json.dumps(shared))
    manifest = json.loads((path / "manifest.json").read_text())
    from foundation import sha256_file

    manifest["files"]["state.json"] = sha256_file(path / "state.json")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="2 processes"):
        CheckpointManager(tmp_path, OneProcess()).load(path, make_state())


def test_checkpoints_hold_no_pickles(tmp_path):
    state = make_state()
    train_steps(state, 1)
    path = CheckpointManager(tmp_path, OneProcess()).save(state)
    suffixes = {os.path.splitext(p)[1] for p in os.listdir(path)}
    assert suffixes <= {".safetensors", ".json"}
