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
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(2), step_dir_name(3)]  # nothing half-deleted

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


def _two_checkpoints(tmp_path, keep_last=3):
    mgr = CheckpointManager(tmp_path, OneProcess(), keep_last=keep_last)
    state = make_state()
    train_steps(state, 1)
    mgr.save(state)
    train_steps(state, 1)
    return mgr, state, mgr.save(state)


@pytest.mark.parametrize("manifest", [b"\xff\xfe\x00 not utf-8", b"[1, 2]", b'"text"', b'{"files": 3}',
                                      b'{"files": {"state.json": 7}}', b'{"files": {"../../etc/passwd": "00"}}',
                                      b'{"files": {}}', b""])
def test_an_unreadable_newest_manifest_falls_back_to_the_previous_checkpoint(tmp_path, manifest):
    mgr, _, newest = _two_checkpoints(tmp_path)
    (newest / "manifest.json").write_bytes(manifest)
    with pytest.raises(CheckpointError):
        mgr.verify(newest)
    fresh = make_state()
    assert mgr.resume(fresh).name == step_dir_name(1) and fresh.step == 1
    assert len(mgr.skipped) == 1 and str(newest) in mgr.skipped[0]


def test_every_checkpoint_damaged_stops_instead_of_starting_over(tmp_path):
    from launch.training.checkpoint import NoUsableCheckpoint

    mgr, _, newest = _two_checkpoints(tmp_path)
    for path in mgr.complete_checkpoints():
        (path / "manifest.json").write_text("{", encoding="utf-8")
    with pytest.raises(NoUsableCheckpoint, match="every checkpoint .* is damaged") as exc:
        mgr.resume(make_state())
    assert "move that folder away" in str(exc.value) and step_dir_name(1) in str(exc.value)


def test_rotation_never_deletes_the_newest_good_checkpoint_for_damaged_later_ones(tmp_path):
    mgr = CheckpointManager(tmp_path, OneProcess(), keep_last=1)
    state = make_state()
    train_steps(state, 1)
    mgr.save(state)  # step 1, good
    later = make_state()
    train_steps(later, 9)
    damaged = CheckpointManager(tmp_path, OneProcess(), keep_last=3).save(later)  # step 9 ...
    (damaged / "module-model.safetensors").write_bytes(b"\0" * 16)  # ... then damaged

    resumed = make_state()
    assert mgr.resume(resumed).name == step_dir_name(1)
    train_steps(resumed, 1)
    mgr.save(resumed)  # step 2: before the fix rotation kept the damaged step 9 and deleted this one
    names = [p.name for p in mgr.complete_checkpoints()]
    assert names == [step_dir_name(2), step_dir_name(9)]
    assert mgr.latest_valid().name == step_dir_name(2)


def test_a_model_of_another_shape_is_refused_by_tensor_name_before_any_weight_loads(tmp_path):
    state = make_state()
    train_steps(state, 1)
    path = CheckpointManager(tmp_path, OneProcess()).save(state)
    wider = make_state()
    wider.modules["model"] = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    before = {k: v.clone() for k, v in wider.modules["model"].state_dict().items()}
    with pytest.raises(CheckpointError, match=r"0\.weight: checkpoint \[8, 4\], model \[16, 4\]"):
        CheckpointManager(tmp_path, OneProcess()).load(path, wider)
    assert all(torch.equal(before[k], v) for k, v in wider.modules["model"].state_dict().items())


def test_a_manifest_that_omits_a_file_the_run_needs_is_refused(tmp_path):
    from foundation import sha256_file

    state = make_state()
    train_steps(state, 1)
    path = CheckpointManager(tmp_path, OneProcess()).save(state)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["optim-opt.safetensors"]  # a consistent manifest that lies by omission
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert sha256_file(path / "state.json") == manifest["files"]["state.json"]
    with pytest.raises(CheckpointError, match="does not list"):
        CheckpointManager(tmp_path, OneProcess()).load(path, make_state())


def test_a_renamed_checkpoint_folder_is_refused(tmp_path):
    state = make_state()
    train_steps(state, 3)
    path = CheckpointManager(tmp_path, OneProcess()).save(state)
    moved = path.rename(tmp_path / step_dir_name(7))
    with pytest.raises(CheckpointError, match="state.json says step 3"):
        CheckpointManager(tmp_path, OneProcess()).load(moved, make_state())


def test_the_run_record_is_saved_with_each_checkpoint_and_covered_by_its_manifest(tmp_path):
    mgr = CheckpointManager(tmp_path, OneProcess())
    mgr.record = {"config": {"lr": 0.1}, "stages": {"autoencoder": {"latent_channels": 4}}}
    state = make_state()
    train_steps(state, 1)
    path = mgr.save(state)
    assert mgr.read_record(path) == mgr.record
    (path / "run.json").write_text('{"config": {"lr": 0.2}, "stages": {}}')
    with pytest.raises(CheckpointError, match="run.json is corrupt"):
        CheckpointManager(tmp_path, OneProcess()).read_record(path)


def test_reaching_the_step_of_a_damaged_checkpoint_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path, OneProcess(), keep_last=3)
    state = make_state()
    train_steps(state, 1)
    mgr.save(state)
    ahead = make_state()
    train_steps(ahead, 2)
    damaged = mgr.save(ahead)
    (damaged / "state.json").write_text("{}")  # step 2 damaged
    resumed = make_state()
    assert mgr.resume(resumed).name == step_dir_name(1)
    train_steps(resumed, 1)
    mgr.save(resumed)  # step 2 again, written over the damaged one
    assert mgr.latest_valid().name == step_dir_name(2) and mgr.skipped == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(1), step_dir_name(2)]


def test_another_set_of_trained_parameters_is_refused_before_any_weight_loads(tmp_path):
    state = make_state()
    train_steps(state, 1)
    path = CheckpointManager(tmp_path, OneProcess()).save(state)
    frozen_first = make_state(seed=5)
    model = frozen_first.modules["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen_first.optimizers["opt"] = torch.optim.AdamW(list(model.parameters())[2:], lr=1e-2)  # first layer frozen
    with pytest.raises(CheckpointError, match=r"saved over \[4\] parameters per group, this run's has \[2\]"):
        CheckpointManager(tmp_path, OneProcess()).load(path, frozen_first)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
