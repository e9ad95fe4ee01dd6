"""What a resumed run may change: compare the new resolved config and stage fingerprints with the run's own.

Every checkpoint carries ``run.json``: the resolved config and the stage fingerprints it was
trained with (autoencoder latent contract with its weights' sha256, text-encoder fingerprint, UNet
constructor arguments). Before any weight is loaded, the rerun's config and fingerprints are
compared with that record, field by field, and each difference falls in one of three kinds:

refused
    the checkpoint would be meaningless with the new value: another autoencoder or text encoder,
    another model shape, objective or data, caching switched on or off (the saved data position
    belongs to the other loader), EMA switched on or off, another seed (the saved data order and
    random streams are the old seed's). No flag overrides these: start a new run.
live
    legitimate mid-run: more steps, a longer time budget, log/checkpoint/validation/sample cadence,
    workers, keep-last, tracker, what is evaluated, a moved stage folder with the same fingerprint.
    Applied, printed and recorded in ``config_history.jsonl``.
override
    everything else (learning rate, batch size, precision, loss weights, ...): refused unless
    named in ``--run.allow-changes`` (a field's dotted name such as ``run.batch_size``, its last
    part such as ``lr``, or ``all``); then applied and recorded in ``config_history.jsonl``.
    ``config.json`` always keeps the config the run was started with.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

HISTORY_FILE = "config_history.jsonl"

# Changes that do not touch the trained trajectory's meaning (dotted config paths).
LIVE_FIELDS = frozenset({
    "run.max_steps", "run.max_train_minutes", "run.log_every", "run.checkpoint_every", "run.keep_last",
    "run.num_workers", "run.report_to", "run.eval_batch_size", "run.process_group_timeout_s",
    "run.crash_after_step", "run.max_skipped_steps", "run.skip_window", "run.output_dir",
    "val_every", "sample_every", "val_data", "val_samples", "sample_prompts", "sample_guidance", "sample_steps",
    "sampler", "stats_samples", "cache_dir", "data.cache_dir", "compile", "gradient_checkpointing", "channels_last",
    # Stage paths and spec strings: the stage fingerprints below decide whether the stage is the same.
    "vae", "text_encoder", "stages.text_encoder.source", "stages.text_encoder.revision",
    "lora_merge", "allow_new_autoencoder", "posthoc_ema.snapshot_every", "eval_every", "eval_classifier",
})
# Changes that make the checkpoint meaningless (a dotted path equal to or below one of these).
REFUSED_PREFIXES = ("stages", "data", "unet", "model", "diffusion", "objective", "loss.discriminator",
                    "cache_latents", "cache_text", "lora_rank", "posthoc_ema.sigma_rels", "decoder_only",
                    "optimizer")  # AdamW's moments and Muon's momentum are different states
# Below a refused prefix but only worth an explicit override.
OVERRIDABLE_UNDER_REFUSED = frozenset({
    "data.max_bad_fraction", "data.bad_fraction_min_seen", "data.allow_pipe_urls", "stages.text_encoder.dtype",
})
NOT_COMPARED = frozenset({"run.allow_changes"})
# Fields added after checkpoints were already being written: what a record without them trained with.
IMPLIED_WHEN_ABSENT = {"optimizer": "adamw", "muon_momentum": 0.95}

_SHOWN = "<absent>"


class ResumeRefused(SystemExit):
    """The rerun's config or stages differ from the run's in a way its checkpoint cannot continue.

    A ``SystemExit`` carrying the message: the command exits 1 with the sentence, no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Change:
    key: str  # dotted path: "lr", "run.batch_size", "stages.autoencoder.latent_channels"
    old: Any
    new: Any
    kind: str  # "refused", "live" or "override"

    def describe(self) -> str:
        return f"{self.key}: {_short(self.old)} -> {_short(self.new)}"


@dataclass
class ResumeDecision:
    """The differences between a run's record and its rerun, and which of them were allowed."""

    changes: list[Change] = field(default_factory=list)
    allowed: tuple[str, ...] = ()

    def _allowed(self, change: Change) -> bool:
        leaf = change.key.rsplit(".", 1)[-1]
        return "all" in self.allowed or change.key in self.allowed or leaf in self.allowed

    @property
    def refused(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "refused"]

    @property
    def needs_override(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "override" and not self._allowed(c)]

    @property
    def applied(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "live" or (c.kind == "override" and self._allowed(c))]

    def problem(self, run_dir: Path, checkpoint: str) -> str | None:
        """The refusal message, or None when the run may continue."""
        refused, blocked = self.refused, self.needs_override
        if not refused and not blocked:
            return None
        lines = [f"cannot resume {run_dir} from {checkpoint}: this command differs from the run's recorded config."]
        if refused:
            lines.append("These changes would make the checkpoint meaningless, so no flag overrides them; restore "
                         "the old value, or start a new run in another --run.output-dir (train_ldm.py --init-from "
                         "OUTPUT/pipeline starts one from this run's exported weights):")
            lines += [f"  {c.describe()}" for c in refused]
        if blocked:
            names = " ".join(sorted({c.key for c in blocked}))
            lines.append("These changes alter the training run; restore the old value, or accept them with "
                         f"--run.allow-changes {names} (recorded in {HISTORY_FILE}):")
            lines += [f"  {c.describe()}" for c in blocked]
        return "\n".join(lines)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted path: leaf}; lists are leaves (compared whole)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def kind_of(key: str, old: Any, new: Any) -> str:
    """"refused", "live" or "override" for a change of ``key`` from ``old`` to ``new``."""
    if key == "run.ema_decay" and (old == 0) != (new == 0):
        return "refused"  # the EMA module appears or disappears: the checkpoint has no (or an unused) EMA
    if key == "run.seed":
        return "refused"  # the saved data order and random streams belong to the old seed (the loaders refuse it too)
    if key in LIVE_FIELDS:
        return "live"
    if key in OVERRIDABLE_UNDER_REFUSED:
        return "override"
    if any(key == p or key.startswith(p + ".") for p in REFUSED_PREFIXES):
        return "refused"
    return "override"


def normalise(record: dict[str, Any]) -> dict[str, Any]:
    """What JSON makes of ``record`` (tuples become lists), so a live config compares with a saved one."""
    return json.loads(json.dumps(record, sort_keys=True))


def compare(recorded: dict[str, Any], current: dict[str, Any], allow: Iterable[str] = ()) -> ResumeDecision:
    """Every difference between two ``{"config": ..., "stages": ...}`` records, classified.

    A stage the record does not carry (a checkpoint written before stages were recorded) is not
    compared; ``check_record`` warns about it.
    """
    old_flat = flatten(normalise(recorded.get("config", {})))
    new_flat = flatten(normalise(current.get("config", {})))
    old_stages, new_stages = normalise(recorded.get("stages") or {}), normalise(current.get("stages") or {})
    for name in sorted(set(old_stages) & set(new_stages)):
        old_flat.update(flatten(old_stages[name], f"stages.{name}"))
        new_flat.update(flatten(new_stages[name], f"stages.{name}"))
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key in NOT_COMPARED:
            continue
        old, new = old_flat.get(key, IMPLIED_WHEN_ABSENT.get(key, _SHOWN)), new_flat.get(key, _SHOWN)
        if old != new:
            changes.append(Change(key, old, new, kind_of(key, old, new)))
    return ResumeDecision(changes, tuple(allow))


def check_record(recorded: dict[str, Any] | None, current: dict[str, Any], allow: Iterable[str],
                 run_dir: Path, checkpoint: str) -> tuple[ResumeDecision, list[str]]:
    """Compare, raise ``ResumeRefused`` with the message; return the decision and any warnings."""
    warnings = []
    if recorded is None:
        warnings.append(f"{checkpoint} records no config (written by an older version); nothing could be "
                        "compared, the rerun's settings are used as given")
        return ResumeDecision(), warnings
    missing = sorted(set(current.get("stages") or {}) - set(recorded.get("stages") or {}))
    if missing:
        warnings.append(f"{checkpoint} records no fingerprint of {', '.join(missing)}; that stage is not checked")
    decision = compare(recorded, current, allow)
    problem = decision.problem(run_dir, checkpoint)
    if problem:
        raise ResumeRefused(problem)
    return decision, warnings


def append_history(run_dir: Path, step: int, checkpoint: str, decision: ResumeDecision) -> None:
    """One JSON line per resume that changed something: which fields, old and new, at which step."""
    if not decision.applied:
        return
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step, "resumed_from": checkpoint,
           "changes": {c.key: {"old": c.old, "new": c.new, "kind": c.kind} for c in decision.applied}}
    path = Path(run_dir) / HISTORY_FILE
    with open(path, "a+b") as f:
        cut = False
        if f.seek(0, 2) > 0:
            f.seek(-1, 2)
            cut = f.read(1) != b"\n"  # a kill cut the last line short: end it before appending
        f.write((("\n" if cut else "") + json.dumps(row, sort_keys=True) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# applying the new hyperparameters after the checkpoint is loaded


def remember_hyperparameters(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, list[dict[str, Any]]]:
    """The freshly built optimizers' hyperparameters (lr, betas, weight decay, ...), before loading.

    ``Optimizer.load_state_dict`` replaces them with the checkpoint's, which would silently ignore
    an accepted ``--lr`` or ``--weight-decay``; ``restore_hyperparameters`` puts them back.
    """
    return {name: [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
            for name, opt in optimizers.items()}


def restore_hyperparameters(optimizers: dict[str, torch.optim.Optimizer], schedules: Iterable[Any],
                            remembered: dict[str, list[dict[str, Any]]]) -> None:
    """Put the new hyperparameters back; LR schedules recompute the current LR from the new base LR.

    Unchanged values give the same numbers the checkpoint held (the LR is recomputed with the
    formula ``LambdaLR.step`` uses), so an unchanged resume stays bitwise identical.
    """
    for name, opt in optimizers.items():
        for group, hyper in zip(opt.param_groups, remembered[name]):
            group.update(hyper)
    for sched in schedules:
        if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            groups = sched.optimizer.param_groups
            sched.base_lrs = [g["initial_lr"] for g in groups]
            lrs = [base * lam(sched.last_epoch) for lam, base in zip(sched.lr_lambdas, sched.base_lrs)]
            for g, lr in zip(groups, lrs):
                g["lr"] = lr
            sched._last_lr = lrs


def _short(value: Any, limit: int = 120) -> str:
    text = value if value is _SHOWN else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
