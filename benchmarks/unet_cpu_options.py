"""What speeds up one stage-3 UNet step on a CPU: each option against the plain fp32 step, interleaved.

The step is train_ldm's: the `small` UNet preset (7.17 M), latents [B, 4, 16, 16] (64 px), text hidden
[B, 77, 384], min-SNR loss (ldm.objective), backward, gradient clipping at 1.0 and AdamW. Variants:

  plain            fp32, contiguous, AdamW as train_ldm builds it on a CPU (for-loop)
  channels_last    the UNet's weights and input in channels-last (NHWC) memory format
  channels_last_input  only the latents in channels-last (weights stay contiguous, so checkpoints
                   and safetensors exports are unchanged; the convolutions follow the input's layout)
  foreach          AdamW(foreach=True): one multi-tensor kernel per update instead of one per parameter
  fused            AdamW(fused=True) (the CPU fused kernel, torch >= 2.4)
  channels_last_fused  both of the above
  bf16_autocast    torch.autocast("cpu", bfloat16) around forward + loss (fp32 weights and optimizer)
  sdpa_math        attention through SDPA's math backend instead of the CPU flash kernel
  attn_classic     diffusers' AttnProcessor (bmm + softmax) instead of AttnProcessor2_0 (SDPA)
  compile          torch.compile(unet) (inductor CPU backend); compile time reported separately
  channels_last_fused_compile  channels-last + fused AdamW (the `small` preset's step), compiled
  channels_last_fused_bf16  channels-last + fused AdamW under bf16 autocast (--run.mixed-precision bf16)
  channels_last_muon  channels-last with --optimizer muon (Muon for matrices and kernels, fused AdamW for
                   the rest): the `small` preset's step since the eighth recipe sweep

    .venv/bin/python -m benchmarks.unet_cpu_options [--steps 5] [--warmup 2] [--threads 1] [--batch-size 32] [--preset small]
        [--variants plain,channels_last,...] [--profile]

Method: every variant has its own copy of the same initial UNet and optimizer; after the warm-up
(compile's first steps are its compile time) the variants alternate step by step, so load bursts from
other jobs hit all of them, and the median wall-clock and CPU time of this process per step are
printed with the ratio to `plain`. `--profile` prints torch.profiler's top operators of one plain step.
Prints numbers only; no assertions.

Measured on the shared 2-core Xeon (AVX512-BF16 and AVX512-FP16, no AMX; torch 2.14.1), batch 32,
median CPU ms per step of this process (wall-clock only where the machine was quiet enough):

  --threads 1 --steps 5 --warmup 2 (load ~5; wall close to CPU)      CPU ms   vs plain
    plain                                                              1033     1.00x
    channels_last                                                       973     1.06x  (0.94x wall)
    foreach AdamW                                                      1073     0.96x
    fused AdamW                                                        1035     1.00x
    bf16 autocast                                                      1642     0.63x
    SDPA math backend                                                  1078     0.96x
    classic attention (AttnProcessor)                                  1082     0.95x
  repeated at load ~10: channels_last 0.99x, channels_last_input 1.04x; at 2 threads (load ~7,
  CPU time inflated 5x by threads waiting for cores) channels_last 1.17x, fused 1.00x.
  torch.compile (--steps 4 --warmup 2, load ~8): 1173 vs 1302 CPU ms per step (1.11x) once compiled;
  compiling took 267 CPU-seconds (this process and inductor's workers; 1,553 s wall at that load), so
  it pays back after ~2,000 steps: not within the demo's ~600-step, 8-minute stage 3.
  torch.profiler of one plain step (1 thread): convolution backward 33%, convolution forward 13%,
  matmuls (mm + addmm) 23%, SDPA flash attention (forward + backward) 7%, GroupNorm 2%, GELU/SiLU
  backward 2%, AdamW 5%.

So on this CPU nothing pays within a short run: bf16 is 1.6x slower without AMX, the optimizer is ~5% of a step
whatever kernel it uses, attention is 7%, and channels-last moves within the noise (and would need
contiguous copies for every safetensors checkpoint and export), so train_ldm kept the plain step.
Later, on a quiet AMX Xeon, `--preset mini --threads 2` (the demo's UNet and threads): fused AdamW
1.06x, channels-last + fused 1.11x; so train_ldm now steps the fused kernel, and the `small` preset
trains channels-last (`--channels-last`). On a quiet AVX2 EPYC (`--preset mini --threads 2 --steps
20 --warmup 3`): fused 375 ms, channels_last_fused 370 ms (1.01x), plain 401 ms (0.93x).
Quiet AMX Xeon, `--preset mini --threads 2 --steps 20 --warmup 3 --variants
channels_last_fused,channels_last_fused_compile` (2026-12-03): 144 vs 130 ms (compiled 1.11x) after 86 s
(115 CPU-s) of compiling: it pays back after ~6,000 steps, about all the demo trains (5,451 in its last
run), so the demo does not compile.
AMD EPYC with AVX512-BF16, no AMX (a shared VM, nothing else of ours running; 2026-12-04), `--threads 2
--steps 30 --warmup 3 --variants plain,channels_last_fused,bf16_autocast,channels_last_fused_bf16`,
wall ms per step: `--preset mini` 262 / 243 (1.08x) / 305 (0.86x) / 299 (0.88x); `--preset small`
684 / 659 (1.04x) / 538 (1.27x) / 580 (1.18x). bf16 autocast pays only for the wider UNet; the AMX
Xeon gave the same split (mini 0.70x, small 1.14x), so the demo's `mini` stage 3 stays fp32.
The same EPYC, quiet, `--preset mini --threads 2 --warmup 3 --variants channels_last_fused,channels_last_muon`
(77-token text): 242 vs 289 ms (Muon 1.19x the step) with 20 steps, and with the order swapped and 30
steps 221 vs 249 ms (1.13x). recipe_sweep.py charges Muon's variants 1.14x.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from ldm.objective import DIFFUSION_PRESETS, DiffusionObjective
from ldm.unet import build_unet, unet_denoiser

VARIANTS = ("plain", "channels_last", "channels_last_input", "foreach", "fused", "channels_last_fused", "bf16_autocast",
            "channels_last_fused_bf16", "sdpa_math", "attn_classic", "compile", "channels_last_fused_compile", "channels_last_muon")


@dataclass
class Variant:
    """One way to run the step: its own UNet copy, optimizer, forward context and input layout."""

    name: str
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    context: Callable[[], AbstractContextManager] = nullcontext
    memory_format: torch.memory_format = torch.contiguous_format
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first_steps: float = 0.0  # wall seconds of the warm-up steps (compile: mostly compile time)
    first_steps_cpu: float = 0.0  # CPU seconds of this process (and finished children) in the warm-up


def make_variant(name: str, base: torch.nn.Module, lr: float = 1e-4) -> Variant:
    unet = copy.deepcopy(base).train()
    adam: dict = {}
    context: Callable[[], AbstractContextManager] = nullcontext
    memory_format = torch.contiguous_format
    if name in ("channels_last", "channels_last_fused", "channels_last_fused_compile", "channels_last_fused_bf16",
                "channels_last_muon"):
        unet = unet.to(memory_format=torch.channels_last)
        memory_format = torch.channels_last
        adam = {"fused": True} if name != "channels_last" else {}
        if name == "channels_last_fused_compile":  # train_ldm's `small` preset with --compile
            unet = torch.compile(unet)
        if name == "channels_last_fused_bf16":  # the `small` preset's step under --run.mixed-precision bf16
            def context() -> AbstractContextManager:
                return torch.autocast("cpu", dtype=torch.bfloat16)
    elif name == "channels_last_input":
        memory_format = torch.channels_last
    elif name == "foreach":
        adam = {"foreach": True}
    elif name == "fused":
        adam = {"fused": True}
    elif name == "bf16_autocast":
        def context() -> AbstractContextManager:
            return torch.autocast("cpu", dtype=torch.bfloat16)
    elif name == "sdpa_math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def context() -> AbstractContextManager:
            return sdpa_kernel(SDPBackend.MATH)
    elif name == "attn_classic":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    elif name == "compile":
        unet = torch.compile(unet)
    elif name != "plain":
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if name == "channels_last_muon":
        from launch.training.optim import make_unet_optimizer

        optimizer = make_unet_optimizer(unet, "muon", lr=lr, betas=(0.9, 0.999), weight_decay=0.01, muon_momentum=0.95,
                                        device=torch.device("cpu"))
    else:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, **adam)
    return Variant(name, unet, optimizer, context, memory_format)


def step(v: Variant, objective: DiffusionObjective, latents: torch.Tensor, hidden: torch.Tensor,
         generator: torch.Generator) -> None:
    """Forward + min-SNR loss + backward + clip + AdamW, as ldm_stage.train_step does it."""
    x = latents.contiguous(memory_format=v.memory_format)
    with v.context():
        loss, _ = objective.loss(unet_denoiser(v.unet), x, hidden, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(v.unet.parameters(), 1.0)
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)


def timed(v: Variant, *args) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step(v, *args)
    return time.perf_counter() - wall, time.process_time() - cpu


def _cpu_with_children() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def profile_plain(v: Variant, *args) -> None:
    from torch.profiler import profile

    with profile() as prof:
        step(v, *args)
    print(f"\n--- torch.profiler, one {v.name} step (top operators by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compile's include compiling)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--preset", default="small", help="UNet preset (ldm.unet.UNET_PRESETS)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one plain step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_unet(args.preset, cross_attention_dim=384)
    objective = DiffusionObjective(DIFFUSION_PRESETS["sd_min_snr"])
    data = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch_size, 4, 16, 16, generator=data)  # [B, 4, 16, 16]
    hidden = torch.randn(args.batch_size, 77, 384, generator=data)  # [B, 77, 384]
    names = [n for n in args.variants.split(",") if n]
    variants = [make_variant(n, base) for n in names]
    gens = {v.name: torch.Generator().manual_seed(1) for v in variants}
    for v in variants:
        start, cpu = time.perf_counter(), _cpu_with_children()
        for _ in range(args.warmup):
            step(v, objective, latents, hidden, gens[v.name])
        v.first_steps, v.first_steps_cpu = time.perf_counter() - start, _cpu_with_children() - cpu
    for _ in range(args.steps):
        for v in variants:
            w, c = timed(v, objective, latents, hidden, gens[v.name])
            v.wall.append(w)
            v.cpu.append(c)
    if args.profile:
        profile_plain(variants[0], objective, latents, hidden, gens[variants[0].name])
    report(variants, args)


def report(variants: list[Variant], args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} UNet, "
          f"batch {args.batch_size} at 64 px, "
          f"{args.steps} steps per variant after {args.warmup} warm-up")
    ref = variants[0]
    ref_wall, ref_cpu = statistics.median(ref.wall), statistics.median(ref.cpu)
    print(f"  {'variant':<16}{'wall ms':>10}{'cpu ms':>10}{'vs ' + ref.name + ' (wall)':>20}{'(cpu)':>8}{'warm-up s':>11}{'(cpu)':>8}")
    for v in variants:
        w, c = statistics.median(v.wall), statistics.median(v.cpu)
        print(f"  {v.name:<16}{w * 1e3:>10.0f}{c * 1e3:>10.0f}{ref_wall / w:>19.2f}x{ref_cpu / c:>7.2f}x"
              f"{v.first_steps:>11.1f}{v.first_steps_cpu:>8.1f}")
    compiled = [v for v in variants if v.name == "compile"]
    if compiled:
        v = compiled[0]
        saved = ref_wall - statistics.median(v.wall)
        extra = v.first_steps - args.warmup * ref_wall
        payback = f"pays back its compile time after {extra / saved:.0f} steps" if saved > 0 else "never pays back"
        print(f"  compile: warm-up {v.first_steps:.1f} s wall ({v.first_steps_cpu:.1f} s CPU) for {args.warmup} "
              f"steps, ~{extra:.0f} s more than plain; by wall-clock it {payback}")


if __name__ == "__main__":
    main()
