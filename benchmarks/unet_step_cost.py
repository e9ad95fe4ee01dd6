"""Seconds per training step of UNet shapes around the `small` preset, as ratios (for equal-wall-clock sweeps).

    python benchmarks/unet_step_cost.py [--threads 1] [--rounds 6]

Forward + backward + AdamW at the demo's shapes (batch 32, 16x16x4 latents, 24 text tokens of width
384), the variants interleaved round by round so machine load affects them alike; medians after
one warm-up round. benchmarks/recipe_sweep.py scales the steps of its shape variants by these ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from ldm.unet import UNET_PRESETS, build_unet


def shapes():
    base = UNET_PRESETS["small"]
    return {"small": base,
            "attention at 16x16 too": dataclasses.replace(base, attention_levels=(True, True, True)),
            "channels (96,192,192)": dataclasses.replace(base, block_out_channels=(96, 192, 192)),
            "2 layers per block": dataclasses.replace(base, layers_per_block=2),
            "channels (48,96,96)": UNET_PRESETS["compact"],
            "(48,96,96) + pooled text": dataclasses.replace(UNET_PRESETS["compact"], pooled_text=True),
            "channels (32,64,64)": dataclasses.replace(UNET_PRESETS["compact"], block_out_channels=(32, 64, 64)),
            "channels (24,48,48)": dataclasses.replace(UNET_PRESETS["compact"], block_out_channels=(24, 48, 48),
                                                       norm_num_groups=8),
            "(32,64,64) + pooled text": dataclasses.replace(UNET_PRESETS["compact"], block_out_channels=(32, 64, 64),
                                                            pooled_text=True),
            "mini + pooled text": dataclasses.replace(UNET_PRESETS["mini"], pooled_text=True),
            "channels (16,32,32)": dataclasses.replace(UNET_PRESETS["mini"], block_out_channels=(16, 32, 32)),
            "mini, batch x2": (UNET_PRESETS["mini"], 2),
            "mini": UNET_PRESETS["mini"],
            "mini + scale-shift": dataclasses.replace(UNET_PRESETS["mini"], scale_shift=True),
            "mini, 2 heads": dataclasses.replace(UNET_PRESETS["mini"], num_heads=2)}


def shape_and_batch_factor(entry) -> tuple:
    """A shapes() entry is a UNet config, or (config, batch multiple) for a batch-size variant."""
    return entry if isinstance(entry, tuple) else (entry, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=None, help="shape names to time (default: all; 'small' always)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    chosen = {k: shape_and_batch_factor(v) for k, v in shapes().items()
              if args.only is None or k == "small" or k in args.only}
    nets = {k: build_unet(cfg, cross_attention_dim=384, latent_channels=4) for k, (cfg, _) in chosen.items()}
    opts = {k: torch.optim.AdamW(n.parameters(), lr=1e-4) for k, n in nets.items()}
    inputs = {}
    for k, (_, factor) in chosen.items():
        b = args.batch * factor
        inputs[k] = (torch.randn(b, 4, 16, 16, generator=g), torch.randint(0, 1000, (b,), generator=g),
                     torch.randn(b, 24, 384, generator=g))
    times: dict[str, list[float]] = {k: [] for k in nets}
    for r in range(args.rounds):
        for k, net in nets.items():
            x, t, context = inputs[k]
            start = time.perf_counter()
            net(x, t, encoder_hidden_states=context).sample.square().mean().backward()
            opts[k].step()
            opts[k].zero_grad()
            if r:
                times[k].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"{'shape':<24} {'params':>8} {'s/step':>7} {'ratio':>6}   ({args.threads} thread(s), batch {args.batch})")
    for k, net in nets.items():
        n = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"{k:<24} {n:7.2f}M {med[k]:7.3f} {med[k] / med['small']:6.2f}")


if __name__ == "__main__":
    main()
