"""Validation PSNR versus training time for an autoencoder preset on a folder of small PNGs.

A quick quality check before the real data loader exists: it loads every PNG of a folder
(compositing transparency onto white), holds out 10%, trains with the ``small`` loss preset
(L2 + KL; ``--reconstruction l1`` for L1) and prints validation PSNR/SSIM every ``--eval-every`` seconds of *training* time (the clock
stops while evaluating). The emoji set of the brief:

    cd /tmp && npm pack emoji-datasource-google@16.0.0 && tar xzf emoji-datasource-google-16.0.0.tgz
    .venv/bin/python -m benchmarks.vae_quality --data-dir /tmp/package/img/google/64 --seconds 240

On a shared 2-core CPU the time axis is pessimistic: other jobs take cycles from the same cores,
so compare runs by images seen (steps x batch) and convert with an idle machine's img/s.

What chose the ``small`` preset (w32-64-64, 0.92M; held-out PSNR in dB on 128 images, * = the
whole held-out 10%; single runs, so differences under ~0.5 dB are noise; all rows but the first
start with posterior_logvar_init=-6, which made no difference visible at batch 32):

    images seen                           800    1600   2400   3200
    b32 lr2e-3 L1, 32 groups             12.4   13.9   14.6   15.1
    b32 lr2e-3 L1, 8 groups              15.0   16.3   17.3   19.1*
    b32 lr2e-3 L2, 32 groups             14.1   15.6   17.2   17.6*
    b32 lr5e-4 L1, 32 groups             12.6   14.4   15.2   16.2*
    b16 lr2e-3 L2, 8 groups              17.1   19.6   18.9   20.4*
    b8  lr1e-3 L1, 8 groups              17.5   20.0   21.4   21.3*
    b8  lr1e-3 L2, 8 groups (= small)    18.5   20.4   21.7   21.4*

    images seen                          2000   4000   6000   8000
    small, b8 lr1e-3 constant            21.3   21.8   23.8   25.7*
    small, b8 lr1e-3 cosine to 10%       21.0   23.5   24.8   25.3*
    w32-64-128 (2.57M), same cosine      19.9   (stopped: 1.5x the CPU time per image)

Smaller batches win at a fixed number of images seen. The idle machine trains ``small`` at
14.2 img/s (batch 8, 2 threads), so 8 minutes is ~6800 images (~850 steps at batch 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from autoencoder import AUTOENCODER_PRESETS, TrainableAutoencoder, build_autoencoder
from autoencoder.losses import AUTOENCODER_LOSS_PRESETS, AutoencoderLoss
from autoencoder.metrics import psnr, ssim
from autoencoder.model import count_parameters
from benchmarks.vae_presets import CANDIDATES


def load_images(folder: Path, size: int) -> torch.Tensor:
    """All PNGs of ``folder`` -> float32 [N, 3, size, size] in [-1, 1], alpha composited onto white."""
    arrays = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB").resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(rgb))
    if not arrays:
        raise FileNotFoundError(f"no .png files in {folder}")
    data = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return data / 127.5 - 1.0


@torch.no_grad()
def evaluate(model: TrainableAutoencoder, images: torch.Tensor) -> tuple[float, float]:
    """Mean validation PSNR and SSIM of the posterior-mean reconstruction."""
    model.eval()
    scores_psnr, scores_ssim = [], []
    for batch in images.split(64):
        recon = model(batch, sample_posterior=False).reconstruction
        scores_psnr.append(psnr(recon, batch))
        scores_ssim.append(ssim(recon, batch))
    model.train()
    return torch.cat(scores_psnr).mean().item(), torch.cat(scores_ssim).mean().item()


def split_holdout(data: torch.Tensor, val_limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train 90%, held-out 10%, the first ``val_limit`` held-out images for periodic evaluation)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234))
    n_val = len(data) // 10
    val, train_set = data[order[:n_val]], data[order[n_val:]]
    return train_set, val, (val[:val_limit] if val_limit else val)


def build(args: argparse.Namespace) -> tuple[TrainableAutoencoder, AutoencoderLoss, torch.optim.Optimizer]:
    cfg = CANDIDATES[args.candidate] if args.candidate else AUTOENCODER_PRESETS[args.preset]
    if args.posterior_logvar_init is not None:
        cfg = dataclasses.replace(cfg, posterior_logvar_init=args.posterior_logvar_init)
    loss_cfg = AUTOENCODER_LOSS_PRESETS["small"]
    if args.reconstruction is not None:
        loss_cfg = dataclasses.replace(loss_cfg, reconstruction=args.reconstruction)
    torch.manual_seed(args.seed)
    model = TrainableAutoencoder(build_autoencoder(cfg), loss_cfg.logvar_init)
    print(f"{cfg}\n{loss_cfg.reconstruction} params {count_parameters(model.vae) / 1e6:.2f}M lr {args.lr} batch {args.batch_size}")
    return model, AutoencoderLoss(loss_cfg), torch.optim.Adam(model.parameters(), lr=args.lr)


def train(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    # Periodic evaluations use --val-limit held-out images (evaluating costs CPU time too);
    # the final line always uses the whole held-out 10%.
    train_set, val, val_periodic = split_holdout(load_images(Path(args.data_dir), args.size), args.val_limit)
    model, loss_fn, opt = build(args)
    gen = torch.Generator().manual_seed(args.seed)
    trained, cpu, step, next_eval = 0.0, 0.0, 0, args.eval_every
    while True:
        for idx in torch.randperm(len(train_set), generator=gen).split(args.batch_size):
            start, cpu_start = time.perf_counter(), time.process_time()
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step)
            x = train_set[idx]
            out = model(x, generator=gen)
            loss, logs = loss_fn.generator_loss(x, out.reconstruction, out.posterior, out.output_logvar, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            trained += time.perf_counter() - start
            cpu += time.process_time() - cpu_start
            final = trained >= args.seconds or (args.steps is not None and step >= args.steps)
            due = step % args.eval_every_steps == 0 if args.eval_every_steps else trained >= next_eval
            if due or final:
                report(model, val if final else val_periodic, logs, trained, cpu, step, args.batch_size, final)
                next_eval += args.eval_every
            if final:
                return


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up, then constant or (with --cosine and a --steps budget) cosine decay to 10%."""
    warm = min(1.0, (step + 1) / max(args.warmup_steps, 1))
    if not args.cosine or args.steps is None:
        return args.lr * warm
    progress = min(1.0, step / args.steps)
    return args.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def report(model, val, logs, trained: float, cpu: float, step: int, batch_size: int, final: bool) -> None:
    p, s = evaluate(model, val)
    print(
        f"{'final ' if final else ''}t={trained:6.1f}s step {step:5d} img/s {step * batch_size / trained:5.1f} "
        f"cpu_s/img {cpu / (step * batch_size):.3f} "
        f"train_rec {logs['reconstruction'].item():.4f} logvar {logs['output_logvar'].item():+.2f} "
        f"val_psnr {p:.2f} dB val_ssim {s:.3f} (n={len(val)})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--preset", default="small", choices=sorted(AUTOENCODER_PRESETS))
    parser.add_argument("--candidate", default=None, choices=sorted(CANDIDATES), help="overrides --preset")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--eval-every", type=float, default=30.0, help="seconds of training time")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--eval-every-steps", type=int, default=0, help="evaluate by steps instead of seconds")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--cosine", action="store_true", help="cosine decay to 10%% over --steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-limit", type=int, default=128, help="held-out images per periodic eval (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--reconstruction", default=None, choices=["l1", "l2"], help="overrides the loss preset's")
    parser.add_argument("--posterior-logvar-init", type=float, default=None, help="overrides the preset's")
    train(parser.parse_args())


if __name__ == "__main__":
    main()
