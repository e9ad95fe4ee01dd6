"""LoRA vs full fine-tuning of the stage-3 UNet: trainable parameters, peak memory, step time.

    python benchmarks/lora_vs_full.py                      # small UNet timed on this CPU, sd15 shapes
    python benchmarks/lora_vs_full.py --device cuda --presets small sd15 --dtype bf16   # GPU: time both

Each timed case runs in its own process so peak memory (CPU: max RSS; CUDA: max allocated) belongs
to that case alone. A step is what train_ldm.py does: forward, backward, AdamW step on the trained
parameters (all of them, or the adapters on the attention projections). ``--shapes-only`` presets
are built on the meta device: parameter counts, and the optimizer-state bytes they imply, no time.

Measured on the shared 2-core CPU machine (OMP_NUM_THREADS=2, batch 8, 16x16x4 latents, 24 tokens of
width 384, rank 8, fp32; load average ~10 from other jobs, so absolute times are inflated, the ratio less):

    small  full: 7,174,340 trainable, 16.6 s/step, max RSS 1.22 GiB
    small  LoRA:   143,360 trainable (2.0%), 8.2 s/step, max RSS 1.17 GiB (~1 GiB is the interpreter + libraries)
    sd15 (shapes): 859,520,964 parameters, LoRA r=8 1,594,368 (0.19%); weights+grads+AdamW state
                   12.8 GiB full fp32 vs 3.2 GiB LoRA on an fp32 base, 1.6 GiB on a bf16 base
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from ldm.lora import LoRAConfig, add_lora, trainable_parameters
from ldm.unet import UNET_PRESETS, build_unet, unet_kwargs

TEXT = {"small": (24, 384), "sd15": (77, 768), "tiny": (12, 32)}  # (tokens, width) of the usual encoder
LATENT = {"small": 16, "sd15": 64, "tiny": 8}


def shapes(preset: str, rank: int) -> dict:
    """Parameter counts on the meta device, and the bytes of weights + grads + AdamW moments."""
    from diffusers import UNet2DConditionModel

    tokens, width = TEXT[preset]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kwargs(UNET_PRESETS[preset], width, 4))
        total = sum(p.numel() for p in unet.parameters())
        lora = add_lora(unet, LoRAConfig(rank=rank))
    fp32 = 4
    return {"preset": preset, "rank": rank, "parameters": total, "lora_trainable": lora,
            "lora_fraction": lora / total,
            # full: fp32 weights, grads, 2 Adam moments; LoRA: frozen weights + the same four for the adapters
            "train_state_gib_full_fp32": 4 * fp32 * total / 2**30,
            "train_state_gib_lora_fp32_base": (fp32 * total + 4 * fp32 * lora) / 2**30,
            "train_state_gib_lora_bf16_base": (2 * total + 4 * fp32 * lora) / 2**30}


def time_case(preset: str, mode: str, rank: int, batch: int, steps: int, device: str, dtype: str) -> dict:
    torch.manual_seed(0)
    tokens, width = TEXT[preset]
    side = LATENT[preset]
    unet = build_unet(preset, width, 4).to(device)
    if mode == "lora":
        add_lora(unet, LoRAConfig(rank=rank))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, side, side, generator=g).to(device)
    hidden = torch.randn(batch, tokens, width, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        with autocast:
            loss = unet(x, t, encoder_hidden_states=hidden).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"preset": preset, "mode": mode, "rank": rank if mode == "lora" else None, "batch": batch,
            "device": device, "dtype": dtype, "trainable": trainable_parameters(unet),
            "step_s": sorted(times)[len(times) // 2], "peak_gib": peak,
            "peak_kind": "cuda max allocated" if device == "cuda" else "process max RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--shapes-only", nargs="*", default=["small", "sd15"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--case", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one timed case
        print(json.dumps(time_case(*args.case, args.rank, args.batch, args.steps, args.device, args.dtype)))
        return
    for preset in args.shapes_only:
        print(json.dumps(shapes(preset, args.rank)))
    for preset in args.presets:
        for mode in ("full", "lora"):
            cmd = [sys.executable, __file__, "--case", preset, mode, "--rank", str(args.rank), "--batch",
                   str(args.batch), "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype]
            print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
