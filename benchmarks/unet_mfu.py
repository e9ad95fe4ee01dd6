"""Stage-3 training throughput and model FLOPs utilisation (MFU) of the UNet step, for GPUs.

    python benchmarks/unet_mfu.py --preset sd15 --resolution 256 --dtype bf16 --compile --batch-size auto

What one step is: the training step from cached latents (the autoencoder and text encoder are not
in the loop, as with ``--cache-latents --cache-text``): noise + timesteps drawn, UNet forward and
backward under autocast, gradient clipping, fused AdamW. Attention runs through PyTorch SDPA
(``build_unet`` checks that diffusers picked it).

MFU = model FLOPs per step (counted once with ``torch.utils.flop_counter.FlopCounterMode`` on the
uncompiled forward+backward: matmuls and convolutions, the FLOPs that count) x steps per second /
the device's peak dense bf16 FLOP/s (a table of known GPUs below, or ``--peak-tflops``).
MosaicML's SD2 training reports about 24% at 256 px on A100s; our goal is 40%.

On a CPU it runs too (use ``--preset small --resolution 64``) to check the script; the MFU column
is then empty unless ``--peak-tflops`` is given. Prints one table row per batch size tried.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ldm.objective import DIFFUSION_PRESETS, DiffusionObjective  # noqa: E402
from ldm.unet import UNET_PRESETS, build_unet, unet_denoiser  # noqa: E402

# Peak dense bf16 tensor-core FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}


def peak_tflops(device: torch.device, override: float) -> float | None:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class Step:
    """One cached-latent training step of the UNet (what train_ldm.py runs with both caches on)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, batch: int):
        torch.manual_seed(0)
        self.unet = build_unet(UNET_PRESETS[args.preset], args.text_width, args.latent_channels).to(device)
        self.unet.train()
        self.objective = DiffusionObjective(DIFFUSION_PRESETS["sd"])
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, fused=device.type == "cuda")
        side = args.resolution // 8
        g = torch.Generator(device).manual_seed(0)
        self.latents = torch.randn(batch, args.latent_channels, side, side, device=device, generator=g)
        self.hidden = torch.randn(batch, args.tokens, args.text_width, device=device, generator=g)
        self.gen = torch.Generator(device).manual_seed(1)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.device = device
        self.model = torch.compile(self.unet) if args.compile else self.unet

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss, _ = self.objective.loss(unet_denoiser(model), self.latents, self.hidden, self.gen)
        return loss

    def __call__(self) -> None:
        self.loss(self.model).backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def flops(self) -> int:
        """Forward + backward FLOPs of one step, counted on the uncompiled UNet."""
        counter = FlopCounterMode(display=False)
        with counter:
            self.loss(self.unet).backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, device: torch.device, batch: int) -> dict[str, float]:
    step = Step(args, device, batch)
    flops = step.flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):  # compile and autotune happen here
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = peak_tflops(device, args.peak_tflops)
    achieved = flops / seconds / 1e12
    return {
        "batch": batch,
        "img_per_s": batch / seconds,
        "step_ms": seconds * 1e3,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else float("nan"),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }


def batch_sizes(args: argparse.Namespace) -> list[int]:
    if args.batch_size != "auto":
        return [int(b) for b in args.batch_size.split(",")]
    return [2**k for k in range(3, 12)]  # doubled until out of memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15", choices=sorted(UNET_PRESETS))
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents are /8)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--text-width", type=int, default=768, help="text encoder hidden size (CLIP ViT-L: 768)")
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (inductor)")
    p.add_argument("--batch-size", default="auto", help="'auto' (double until OOM) or a comma list")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak; default from the GPU's name")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.preset} UNet, {args.resolution} px, {args.dtype}, compile={args.compile}, device {name}")
    print(f"{'batch':>6} {'img/s':>9} {'step ms':>9} {'TFLOP/step':>11} {'TFLOP/s':>9} {'MFU':>6} {'peak GiB':>9}")
    for batch in batch_sizes(args):
        try:
            r = measure(args, device, batch)
        except torch.OutOfMemoryError:
            print(f"{batch:>6} out of memory")
            break
        print(f"{r['batch']:>6} {r['img_per_s']:>9.1f} {r['step_ms']:>9.1f} {r['tflop_per_step']:>11.3f} "
              f"{r['achieved_tflops']:>9.1f} {r['mfu']:>6.1%} {r['peak_mem_gib']:>9.1f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
