"""Helpers for end-to-end tests of the entry points: tiny generated data and launch commands."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 210, 40)}


def make_captioned_folder(folder: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    """Coloured discs and squares on white with sidecar captions ("a red disc")."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        shape = "disc" if (i // len(names)) % 2 == 0 else "square"
        img = np.full((size, size, 3), 255, np.uint8)
        cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
        r = size // 4
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if shape == "disc" else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        img[inside] = COLOURS[colour]
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a {colour} {shape}", encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(script: str, num_processes: int = 2) -> list[str]:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(ROOT / script)]


def run(cmd: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_tiny_autoencoder_folder(folder: Path, images: Path) -> Path:
    """A randomly initialised `tiny` autoencoder saved the way stage 1 saves it (statistics folded)."""
    import torch

    from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
    from autoencoder.folder import save_autoencoder
    from autoencoder.latents import LatentStatistics, fold_latent_statistics

    torch.manual_seed(0)
    cfg = AUTOENCODER_PRESETS["tiny"]
    vae = build_autoencoder(cfg).eval()
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.png"))]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    stats = LatentStatistics(cfg.latent_channels)
    with torch.no_grad():
        stats.update_from_posterior(vae.encode(x).latent_dist, generator=torch.Generator().manual_seed(0))
    save_autoencoder(vae, fold_latent_statistics(vae, stats, cfg), folder)
    return folder
