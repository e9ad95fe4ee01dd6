"""Atomic, verified, rotating training checkpoints shared by every training script.

A checkpoint is a folder ``step_00001234/`` under the run's ``checkpoints/`` folder:

  module-<name>.safetensors     weights of each module (EMA too: it is a module), written by rank 0
  optim-<name>.safetensors      the optimizer's tensors ...
  optim-<name>.json             ... and the rest of its state_dict (param groups, scalar step counts)
  state.json                    step, LR schedules, grad scaler, counters (rank 0)
  rank-<r>.json                 per-process state: every torch.Generator, the data position
  run.json                      the resolved config and stage fingerprints (``resume_check``)
  manifest.json                 sha256 of every file above, written last

Why not accelerate's ``save_state``: with a total limit it deletes the old checkpoint before the
new one is complete, ``load_state`` then picks a half-written folder, a missing RNG file is only
logged, and its custom objects are pickles. Here:

1. every file is written into ``.tmp-step_00001234/`` and fsynced;
2. rank 0 writes ``manifest.json`` last, fsyncs, and renames the folder into place;
3. only then are checkpoints beyond ``keep_last`` deleted;
4. resume verifies the manifest (sha256 catches a flipped byte that safetensors alone would load)
   and falls back to the previous checkpoint when the newest is damaged (any unreadable manifest,
   missing or altered file); when every checkpoint is damaged it stops (``NoUsableCheckpoint``)
   instead of starting over in the run's folder;
5. rotation only ever deletes checkpoints older than the one just written: damaged ones from
   further on (skipped at resume) never push the new, good one out.

Weights and optimizer state in DDP are identical on every rank, so rank 0 writes them once.
Strategies that shard either (FSDP, DeepSpeed ZeRO-1/2/3, Megatron-LM) would need every rank to
write its shard; ``accelerator.setup_accelerator`` refuses them with a message, whether the launch
asked for one or accelerate reports one (tests/test_accelerator.py), until that is supported.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from foundation import fsync_dir, fsync_file, sha256_file
from launch.training.state_files import (
    generator_state,
    global_rng_state,
    match_parameter_layouts,
    optimizer_from_files,
    optimizer_to_files,
    restore_generator,
    restore_global_rng,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORD_FILE = "run.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# Checkpoints verified in this process: path -> stamp of its files. Resume checks the
# newest checkpoint's record before the data is set up and loads it later; hashing gigabytes once is enough.
_VERIFIED: dict[Path, tuple] = {}


def _stamp(folder: Path, names: list[str]) -> tuple:
    """(name, size, mtime_ns) of each file: a file rewritten since it was hashed changes its stamp."""
    return tuple((n, (st := (folder / n).stat()).st_size, st.st_mtime_ns) for n in names)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing files, a bad hash, or a mismatched run."""


class NoUsableCheckpoint(CheckpointError):
    """Checkpoints exist but none verifies: resuming is impossible and starting over would hide it."""


class JSONStateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class Distributed(Protocol):
    """The part of ``accelerate.Accelerator`` this module uses (a stub in single-process tests)."""

    process_index: int
    num_processes: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


@dataclass
class TrainState:
    """Everything a run needs to continue bitwise identically after a restart."""

    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # unwrapped; EMA included
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    shared: dict[str, JSONStateful] = field(default_factory=dict)  # LR schedules, grad scaler
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # this rank's streams
    per_rank: dict[str, JSONStateful] = field(default_factory=dict)  # the data loader position
    step: int = 0
    counters: dict[str, float] = field(default_factory=dict)  # skipped steps, training seconds


# ---------------------------------------------------------------------------------------------
# file helpers


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    fsync_file(path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses shared storage and non-contiguous views; clone to be safe.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    fsync_file(path)


# ---------------------------------------------------------------------------------------------
# the manager


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not UTF-8 JSON ({e})") from e


def _read_manifest(path: Path) -> dict[str, Any]:
    """A manifest that is a JSON object mapping plain file names to sha256 strings, listing state.json."""
    manifest = _read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CheckpointError(f"{path} is not a checkpoint manifest (expected a JSON object whose 'files' maps names to sha256)")
    bad = [k for k in files if "/" in k or "\\" in k or k in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"{path} lists names outside its folder: {bad}")
    if "state.json" not in files:
        raise CheckpointError(f"{path} does not list state.json")
    return manifest


def check_tensor_shapes(path: Path, expected: dict[str, torch.Tensor], what: str) -> None:
    """Refuse, naming the tensors, a weight file whose names or shapes differ from the module's (read from the header only)."""
    with safe_open(str(path), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wanted = {k: tuple(v.shape) for k, v in expected.items()}
    problems = [f"{k} missing from the checkpoint" for k in sorted(set(wanted) - set(saved))]
    problems += [f"{k} not in the model" for k in sorted(set(saved) - set(wanted))]
    problems += [f"{k}: checkpoint {list(saved[k])}, model {list(wanted[k])}"
                 for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{path}: the saved {what} does not fit the model this run built ({shown}). "
                              "The model's shape changed since the checkpoint; restore the old settings or start a new run.")


class CheckpointManager:
    """Saves and restores ``TrainState`` under ``root`` for one run (all processes call it)."""

    def __init__(self, root: str | Path, dist: Distributed, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (got {keep_last}): a run needs one checkpoint to resume")
        self.root = Path(root)
        self.dist = dist
        self.keep_last = keep_last
        self.record: dict[str, Any] | None = None  # written into each checkpoint as run.json when set
        self.skipped: list[str] = []  # why each damaged checkpoint was passed over by latest_valid

    # -- listing -----------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Renamed-into-place checkpoint folders, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def verify(self, path: Path) -> dict[str, Any]:
        """Return the manifest of ``path`` after checking every file's sha256; raise if anything is off.

        Any damage is a ``CheckpointError``: a missing, non-UTF-8, non-JSON or mis-shaped manifest,
        a listed file missing or altered, a listing without ``state.json``. A checkpoint verified
        once in this process is not hashed again while no file's size or mtime changed.
        """
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise CheckpointError(f"{path}: no manifest.json, so the save never completed")
        manifest = _read_manifest(manifest_path)
        for name in manifest["files"]:
            if not (path / name).is_file():
                raise CheckpointError(f"{path}: {name} is listed in the manifest but missing")
        stamp = _stamp(path, ["manifest.json", *manifest["files"]])
        if _VERIFIED.get(path) == stamp:
            return manifest
        for name, digest in manifest["files"].items():
            if sha256_file(path / name) != digest:
                raise CheckpointError(f"{path}: {name} is corrupt (its sha256 does not match the manifest)")
        _VERIFIED[path] = stamp
        return manifest

    def latest_valid(self) -> Path | None:
        """Newest checkpoint that verifies; damaged ones are logged, listed in ``skipped`` and passed over.

        None when there is no checkpoint at all (a fresh run). When checkpoints exist and every one
        is damaged, raise ``NoUsableCheckpoint``: a fresh start would silently train over the run.
        """
        self.skipped = []
        for path in reversed(self.complete_checkpoints()):
            try:
                self.verify(path)
                return path
            except (CheckpointError, OSError) as e:
                reason = str(e) if isinstance(e, CheckpointError) else f"{path}: unreadable ({e})"
                self.skipped.append(reason)
                log.info("skipping damaged checkpoint: %s", reason)  # the caller shows ``skipped`` to the user
        if self.skipped:
            raise NoUsableCheckpoint(
                f"every checkpoint in {self.root} is damaged, so this run cannot resume:\n  "
                + "\n  ".join(self.skipped)
                + f"\nNothing was loaded or overwritten. Restore a checkpoint from a backup into {self.root}, or, "
                "to start this run over from step 0, move that folder away (or pick another --run.output-dir)."
            )
        return None

    def read_record(self, path: Path) -> dict[str, Any] | None:
        """The config and stage fingerprints saved with ``path`` (None: written before they were saved)."""
        manifest = self.verify(path)
        if RECORD_FILE not in manifest["files"]:
            return None
        record = _read_json(Path(path) / RECORD_FILE)
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}: {RECORD_FILE} is not a JSON object")
        return record

    # -- saving ------------------------------------------------------------------------------

    def save(self, state: TrainState) -> Path:
        """Write ``state`` atomically; every process must call this at the same step."""
        final = self.root / step_dir_name(state.step)
        tmp = self.root / f".tmp-{final.name}"
        if self.dist.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.dist.wait_for_everyone()
        self._write_rank_file(tmp, state)
        if self.dist.is_main_process:
            self._write_shared_files(tmp, state)
        self.dist.wait_for_everyone()  # every rank's file is on disk before the manifest
        if self.dist.is_main_process:
            self._finalise(tmp, final, state.step)
            self._rotate(state.step)
        self.dist.wait_for_everyone()
        return final

    def _write_rank_file(self, tmp: Path, state: TrainState) -> None:
        payload = {
            "generators": {k: generator_state(g) for k, g in state.generators.items()},
            "per_rank": {k: obj.state_dict() for k, obj in state.per_rank.items()},
            "global_rng": global_rng_state(),
        }
        _write_json(tmp / f"rank-{self.dist.process_index}.json", payload)

    def _write_shared_files(self, tmp: Path, state: TrainState) -> None:
        for name, module in state.modules.items():
            _write_tensors(tmp / f"module-{name}.safetensors", module.state_dict())
        for name, opt in state.optimizers.items():
            tensors, meta = optimizer_to_files(opt)
            _write_tensors(tmp / f"optim-{name}.safetensors", tensors)
            _write_json(tmp / f"optim-{name}.json", meta)
        shared = {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "world_size": self.dist.num_processes,
            "counters": state.counters,
            "shared": {k: obj.state_dict() for k, obj in state.shared.items()},
        }
        _write_json(tmp / "state.json", shared)
        if self.record is not None:
            _write_json(tmp / RECORD_FILE, self.record)

    def _finalise(self, tmp: Path, final: Path, step: int) -> None:
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        missing = [f"rank-{r}.json" for r in range(self.dist.num_processes) if f"rank-{r}.json" not in files]
        if missing:
            raise CheckpointError(f"{tmp}: processes did not write {missing}; is the folder on a shared filesystem?")
        _write_json(tmp / "manifest.json", {"format_version": FORMAT_VERSION, "step": step, "files": files})
        fsync_dir(tmp)
        doomed = None
        if final.exists():  # a damaged checkpoint of this step, skipped at resume: set aside, not deleted first
            doomed = self.root / f".old-{final.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(final, doomed)
        os.replace(tmp, final)
        fsync_dir(self.root)
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)

    def _rotate(self, saved_step: int) -> None:
        # Only checkpoints up to the one just written count: anything further on was skipped as
        # damaged at resume, and letting it count would delete the newest good checkpoint.
        complete = [p for p in self.complete_checkpoints() if int(_STEP_DIR.match(p.name).group(1)) <= saved_step]
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            # Renamed first: a kill halfway through the delete leaves a hidden folder, never a step_
            # folder with files missing that a resume would have to reject.
            doomed = self.root / f".old-{old.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for stale in [*self.root.glob(".tmp-step_*"), *self.root.glob(".old-step_*")]:
            shutil.rmtree(stale, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------

    def load(self, path: Path, state: TrainState) -> None:
        """Restore ``state`` in place from ``path`` (verified first; tensor names and shapes checked before loading)."""
        manifest = self.verify(path)
        listed = set(manifest["files"])
        needed = ["state.json", f"rank-{self.dist.process_index}.json"]
        needed += [f"module-{n}.safetensors" for n in state.modules]
        needed += [f"optim-{n}.{ext}" for n in state.optimizers for ext in ("safetensors", "json")]
        unlisted = [n for n in needed if n not in listed]
        if unlisted:
            raise CheckpointError(f"{path}: its manifest does not list {unlisted}; this run's state is not in it")
        shared = _read_json(path / "state.json")
        named = _STEP_DIR.match(Path(path).name)
        if named and int(shared["step"]) != int(named.group(1)):
            raise CheckpointError(f"{path}: state.json says step {shared['step']}, the folder name another; it was renamed or mixed up")
        if shared["world_size"] != self.dist.num_processes:
            raise CheckpointError(
                f"{path} was written by {shared['world_size']} processes but this run has "
                f"{self.dist.num_processes}; an exact resume needs the same number of processes "
                "(each one's random streams and data position are saved). Relaunch with the original count."
            )
        for name, module in state.modules.items():
            check_tensor_shapes(path / f"module-{name}.safetensors", module.state_dict(), name)
        metas = {name: _read_json(path / f"optim-{name}.json") for name in state.optimizers}
        for name, opt in state.optimizers.items():
            saved = [len(g["params"]) for g in metas[name]["param_groups"]]
            wanted = [len(g["params"]) for g in opt.param_groups]
            if saved != wanted:
                raise CheckpointError(
                    f"{path}: optimizer {name!r} was saved over {saved} parameters per group, this run's has {wanted}: "
                    "the set of trained parameters changed since the checkpoint; restore the old settings or start a new run."
                )
        for name, module in state.modules.items():
            module.load_state_dict(load_file(str(path / f"module-{name}.safetensors")))
        for name, opt in state.optimizers.items():
            opt.load_state_dict(optimizer_from_files(load_file(str(path / f"optim-{name}.safetensors")), metas[name]))
            match_parameter_layouts(opt)
        for name, obj in state.shared.items():
            obj.load_state_dict(shared["shared"][name])
        self._load_rank_file(path, state)
        state.step = int(shared["step"])
        state.counters.update(shared["counters"])

    def _load_rank_file(self, path: Path, state: TrainState) -> None:
        mine = json.loads((path / f"rank-{self.dist.process_index}.json").read_text(encoding="utf-8"))
        for name, g in state.generators.items():
            if name not in mine["generators"]:
                raise CheckpointError(f"{path}: no saved state for random stream {name!r}")
            restore_generator(g, mine["generators"][name])
        for name, obj in state.per_rank.items():
            obj.load_state_dict(mine["per_rank"][name])
        restore_global_rng(mine["global_rng"])

    def resume(self, state: TrainState) -> Path | None:
        """Load the newest valid checkpoint into ``state``; return its path, or None for a fresh run."""
        path = self.latest_valid()
        if path is not None:
            self.load(path, state)
        return path
