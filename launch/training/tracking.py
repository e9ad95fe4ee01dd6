"""Metrics for the training scripts: log accumulation on the device, reduction across processes at
log intervals only, ``metrics.jsonl`` + tensorboard (or wandb), and the progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from foundation import write_bytes_atomic

def add_logs(into: dict[str, torch.Tensor], logs: dict[str, torch.Tensor], scale: float) -> None:
    for k, v in logs.items():
        into[k] = into.get(k, 0) + v * scale


def accumulate_logs(sums: dict[str, torch.Tensor], logs: dict[str, torch.Tensor]) -> None:
    """Sum logs on the device between log intervals (no host sync per step)."""
    add_logs(sums, logs, 1.0)
    sums["_count"] = sums.get("_count", 0) + 1


def reduce_logs(acc, sums: dict[str, torch.Tensor], **extra: float) -> dict[str, float]:
    """Mean over steps since the last call and over processes; clears ``sums``."""
    count = sums.pop("_count", 0)
    if not count:
        return dict(extra)
    keys = sorted(sums)
    stacked = torch.stack([torch.as_tensor(sums[k], device=acc.device, dtype=torch.float32) for k in keys])
    stacked = acc.reduce(stacked, reduction="mean") / count
    sums.clear()
    return {**dict(zip(keys, stacked.tolist())), **extra}



class MetricsLogger:
    """Main-process metrics: ``metrics.jsonl`` always, tensorboard or wandb when asked."""

    def __init__(self, accelerator, output_dir: Path, report_to: str, run_name: str, config: dict[str, Any]):
        self.enabled = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("--run.report-to wandb needs the wandb package: pip install wandb") from e
            self.wandb = wandb.init(project="latent-diffusion", name=run_name, config=config, resume="allow")

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def forget_after(self, step: int) -> int:
        """On resume from ``step``: drop the rows of later steps (they are trained again) and any partial
        line a kill left, so every step appears once; returns how many lines were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = [line for line in lines if (row := _parse(line)) is not None and row.get("step", 0) <= step]
        if len(kept) != len(lines):
            write_bytes_atomic(self.path, "".join(line + "\n" for line in kept).encode("utf-8"))
        return len(lines) - len(kept)

    def log_image(self, step: int, tag: str, path: Path) -> None:
        """A picture already saved as ``path`` (e.g. a sample grid) to the tracker, under ``tag``."""
        if not self.enabled:
            return
        if self.tb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
            self.tb.add_image(tag, pixels, step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_bar(accelerator, start: int, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line a kill cut short is skipped."""
    if not path.is_file():
        return []
    rows = (_parse(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
    return [row for row in rows if row is not None]


def _parse(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
