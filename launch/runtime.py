"""Shared run-time plumbing for the training scripts: one copy, called by train_vae and train_ldm.

What lives here: the options every training run has (``RunConfig``), accelerator setup, named
random streams, preemption signals, the all-rank decision to skip a non-finite step, EMA, the LR
schedule, metrics (tensorboard + metrics.jsonl + optional wandb) and the progress bar.
Checkpoint files are ``launch/checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Literal

import torch

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Options every training run shares."""

    output_dir: Path = Path("runs/default")
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 32
    """Per process, per micro-step."""
    grad_accum_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    max_grad_norm: float = 1.0
    """0 disables clipping (the norm is still computed to catch non-finite gradients)."""
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    ema_decay: float = 0.999
    """0 disables EMA."""
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 25
    max_skipped_steps: int = 20
    """Abort when more than this many steps in the last ``skip_window`` were non-finite."""
    skip_window: int = 200
    num_workers: int = 2
    """Data-loader worker processes per training process."""
    cpu: bool = False
    """Force the CPU even when a GPU is present (always on when none is)."""
    process_group_timeout_s: int = 1800
    """A rank that hangs longer than this in a collective ends the run."""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    max_train_minutes: float = 0.0
    """Stop (checkpoint + final export) after this much training time in total; 0 means no limit."""
    crash_after_step: int = 0
    """Fault injection for resume tests: rank 0 SIGKILLs itself right after this step (0: never)."""


# ---------------------------------------------------------------------------------------------
# accelerator


def setup_accelerator(run: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    cpu = run.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=run.mixed_precision,
        # Accumulation is done by the training step itself (no_sync on all but the last micro-batch),
        # so accelerate's own micro-step counter never has to be checkpointed.
        gradient_accumulation_steps=1,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=run.process_group_timeout_s))],
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise SystemExit("DeepSpeed ZeRO-3 shards the weights; our checkpoints need them whole. Use ZeRO-1/2 or DDP.")
    if torch.cuda.is_available() and not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return accelerator


def make_generators(seed: int, rank: int, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Generator]:
    """One independent generator per named random stream and process.

    Seeds are a hash of (seed, name, rank), so streams never overlap, each rank draws different
    noise, and adding a stream does not shift the others.
    """
    out = {}
    for name in names:
        digest = hashlib.sha256(f"{seed}/{name}/{rank}".encode()).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        out[name] = g
    return out


# ---------------------------------------------------------------------------------------------
# preemption and non-finite steps


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; ``StepGuard`` shares it with every rank at the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.raised = False
        self.signal_name = ""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True
        self.signal_name = signal.Signals(signum).name


class TooManySkippedSteps(RuntimeError):
    pass


class StepGuard:
    """Decides, identically on every rank, whether to apply a step and whether to stop.

    One small all-reduce per optimizer step carries two flags: "this step's gradient norm was not
    finite" and "a preemption signal arrived here". The DDP all-reduce already makes gradients
    (and so their norm) identical across ranks, but a rank-local decision would still deadlock if
    anything differed, so the decision is made on the reduced flags.
    """

    def __init__(self, accelerator, run: RunConfig, preemption: PreemptionFlag):
        self.accelerator = accelerator
        self.preemption = preemption
        self.deadline = math.inf  # wall-clock end of the training-time budget
        self.time_up = False  # set by check(), identical on every rank
        self.max_skipped = run.max_skipped_steps
        self.recent_skips: deque[int] = deque()
        self.window = run.skip_window
        self.total_skipped = 0

    def start_clock(self, run: RunConfig, train_seconds_so_far: float) -> None:
        """Arm the ``max_train_minutes`` budget (training time carries over resumes)."""
        if run.max_train_minutes > 0:
            self.deadline = time.time() + run.max_train_minutes * 60 - train_seconds_so_far

    def check(self, grad_norm: torch.Tensor | None, step: int) -> tuple[bool, bool]:
        """Return (apply_this_step, stop_now). Call after clipping, before ``optimizer.step``.

        Also agrees on whether the time budget is spent (``self.time_up``): clocks differ between
        processes, and one rank ending the loop a step early would deadlock the others.
        """
        device = self.accelerator.device
        bad = torch.zeros((), device=device) if grad_norm is None else (~torch.isfinite(grad_norm)).float()
        local = [float(self.preemption.raised), float(time.time() >= self.deadline)]
        flags = torch.cat([bad.reshape(1).to(device), torch.tensor(local, device=device)])
        flags = self.accelerator.reduce(flags, reduction="sum")
        skip, stop, self.time_up = (bool(v > 0) for v in flags.tolist())
        if skip:
            self._count_skip(step)
        return not skip, stop

    def _count_skip(self, step: int) -> None:
        self.total_skipped += 1
        self.recent_skips.append(step)
        while self.recent_skips and self.recent_skips[0] <= step - self.window:
            self.recent_skips.popleft()
        log.warning("step %d: non-finite loss or gradient on some process; skipped on all (%d so far)", step, self.total_skipped)
        if len(self.recent_skips) > self.max_skipped:
            raise TooManySkippedSteps(
                f"{len(self.recent_skips)} of the last {self.window} steps had non-finite losses or gradients "
                f"(limit {self.max_skipped}). The run is diverging: lower the learning rate, enable gradient "
                "clipping (--run.max-grad-norm 1.0), use bf16 rather than fp16, or check the data for broken samples."
            )


# ---------------------------------------------------------------------------------------------
# EMA and LR schedule


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


def make_lr_schedule(optimizer: torch.optim.Optimizer, run: RunConfig):
    """Warmup then constant / cosine / linear decay, from diffusers (its state_dict is JSON-ready)."""
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[run.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=run.warmup_steps, num_training_steps=run.max_steps)


class GradScalerState:
    """Adapter so accelerate's fp16 grad scaler (or None) checkpoints as JSON."""

    def __init__(self, accelerator):
        self.scaler = accelerator.scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# run life cycle

FINISHED_MARKER = "finished.json"


def mark_finished(folder: Path, step: int, train_seconds: float) -> None:
    """Written last into a run's exported model: its presence means the export is complete."""
    _atomic_json(Path(folder) / FINISHED_MARKER, {"step": step, "train_seconds": train_seconds})


def run_finished(folder: Path, run: RunConfig) -> bool:
    """True when ``folder`` holds a complete export that satisfies ``run``'s step or time budget.

    Rerunning with a larger ``max_steps`` or ``max_train_minutes`` is not finished: it resumes.
    """
    marker = Path(folder) / FINISHED_MARKER
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text(encoding="utf-8"))
    if done["step"] >= run.max_steps:
        return True
    return run.max_train_minutes > 0 and done["train_seconds"] >= run.max_train_minutes * 60


def end_of_step(ckpt, state, run: RunConfig, accelerator, stop: bool, last: bool) -> None:
    """Checkpoint on schedule, at the end, or when preempted; then the resume tests' fault injection."""
    if stop or last or state.step % run.checkpoint_every == 0:
        ckpt.save(state)
    maybe_crash(run, state.step, accelerator)


def end_of_loop(accelerator, module: torch.nn.Module, what: str, guard: StepGuard, logger, step: int, stop: bool) -> None:
    """Check the ranks agree; when preempted, say how to resume and exit non-zero (128 + SIGTERM)."""
    check_ranks_in_sync(accelerator, module, what)
    if stop:
        accelerator.print(f"stopped by {guard.preemption.signal_name} at step {step}; rerun the same command to resume")
        logger.close()
        accelerator.end_training()
        raise SystemExit(143)


@torch.no_grad()
def check_ranks_in_sync(accelerator, module: torch.nn.Module, what: str) -> None:
    """Raise unless every process holds the same weights (DDP promises it; a desync is a bug to catch).

    Compares a float64 sum and sum of squares of all parameters across ranks: one tiny gather.
    """
    params = [p.detach().double() for p in module.parameters()]
    local = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
    everyone = accelerator.gather(local.to(accelerator.device).unsqueeze(0))  # [world, 2]
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError(f"{what}: the processes hold different weights {everyone.tolist()}; DDP went out of sync")
    if accelerator.num_processes > 1:
        log.info("%s: weights identical on all %d processes", what, accelerator.num_processes)


def maybe_crash(run: RunConfig, step: int, accelerator) -> None:
    if run.crash_after_step and step == run.crash_after_step and accelerator.is_main_process:
        import os

        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    tmp.replace(path)
