"""Stage-3 training throughput and where a step's time goes: on the fly (before / now) and cached.

The setup of issue 18 (the one compared with diffusers' train_text_to_image.py): the `small` UNet
preset, the `small` autoencoder preset at 64 px, a 6-layer 384-wide CLIP text encoder at 77 tokens
(random weights, open_clip's BPE vocabulary, saved and loaded through `hf:` as a user would), batch
32, AdamW, EMA, min-SNR (gamma 5), 10% caption dropout, fp32 UNet, on generated captioned PNGs:

  on the fly, before: the frozen encoders as they ran before issue 18, replayed here: fp32, no_grad,
                      the prompts tokenised twice (the second pass counted over-long ones), every
                      caption encoded, `vae.encode(...)` on the training autoencoder
  on the fly, now:    `FrozenTextEncoder.encode` and `autoencoder.frozen.FrozenEncoder`, both loaded
                      with dtype=auto (one tokenisation, each distinct caption once, inference mode;
                      bf16 on bf16 GPUs and AMX CPUs, fp32 here: see text_encoder/precision.py); the
                      caption-dropout mask drawn first, so the ~10% dropped captions are not encoded
  cached:             `--cache-latents --cache-text` (ldm.cache): gather + sample the posterior
  diffusers:          the step of diffusers' examples/text_to_image/train_text_to_image.py, on the
                      same models and images (benchmarks/diffusers_reference.py says what it does)

Every mode clips the gradient norm at 1.0 and updates an EMA, as train_ldm.py and the example do.

    .venv/bin/python -m benchmarks.train_throughput [--steps 6] [--warmup 2] [--threads 0] [--workers 0]
        [--distinct-captions 0] [--profile]

Method: the three modes alternate step by step after a warm-up (first steps build oneDNN kernels and
the optimizer state), so a burst of load from other jobs on a shared CPU hits all of them; each phase
is timed in wall-clock and in this process's CPU time (steadier on a busy machine) and the median over
steps is printed as a table. `--distinct-captions N` gives the images N captions in turn (class-label
style data, where deduplication pays); 0 keeps every caption distinct, as in issue 18. `--profile`
prints torch.profiler's top operators for one step of each mode. Prints numbers only; no assertions.

Measured on the shared 2-core Xeon (AVX512-BF16, no AMX, so dtype=auto is fp32 for both encoders;
torch 2.14.1, `--threads 1`, load average ~10 from other jobs: wall-clock is mostly waiting, CPU time
is the steadier figure). Median ms per step, CPU time of this process:

  --steps 8 --warmup 2 (captions all distinct, the issue-18 setup)
    phase              diffusers      before         now      cached
    data/collate              49          26          28           2
    VAE encode               300         326         237           -
    text encode              657         687         682           -
    UNet fwd+bwd            1065        1169        1145        1153
    optimizer+EMA            103          90          88          90
    step                    2162        2290        2163        1250
    vs diffusers' example: before 0.94x, now 1.00x, cached 1.73x (wall-clock: 0.89x, 0.95x, 1.64x;
    issue 18 measured 0.97x / 0.86x and 1.79x / 1.67x); now / before 1.06x CPU, 1.07x wall.

  --steps 4 --warmup 1 --distinct-captions 4 (4 distinct captions per batch)
    phase              diffusers      before         now      cached
    data/collate              39          27          31           2
    VAE encode               268         268         228           -
    text encode              580         657         103           -
    UNet fwd+bwd            1039        1186        1040        1002
    optimizer+EMA             95          94          87          80
    step                    2016        2265        1486        1082
    vs diffusers' example: before 0.89x, now 1.36x, cached 1.86x; now / before 1.52x.

  After the dropout mask moved before encoding (2026-12-02; --steps 6 --warmup 2 --threads 1, load
  average 7-12 from other jobs, this process got 6-90% of a core, so only the CPU-time table counts):
    phase              diffusers      before         now      cached
    data/collate              41          26          22           2
    VAE encode               263         267         214           -
    text encode              630         649         622           -
    UNet fwd+bwd            1092        1038        1046        1038
    optimizer+EMA            105          82          80          89
    step                    2132        2065        1989        1133
    vs diffusers' example: before 1.03x, now 1.07x, cached 1.88x (CPU time; wall-clock 0.99x, 0.74x,
    1.79x, meaningless at that load). Text encode now/diffusers 0.99x (0.90 expected from 10% fewer
    captions: within this load's noise); the UNet phase is the same in every mode, the 8% gap above
    was noise. Where the UNet step goes and what was tried there: benchmarks/unet_cpu_options.py.

On a quiet 2-core Xeon with AMX (2026-12-02, nothing else running; dtype=auto is bf16 for both
frozen encoders there), `--steps 6 --warmup 2 --threads 1`, median CPU ms per step:
    phase              diffusers      before         now      cached
    data/collate              21          11          11           2
    VAE encode               137         153          59           -
    text encode              413         426         115           -
    UNet fwd+bwd             661         668         668         666
    optimizer+EMA             54          47          47          47
    step                    1288        1305         909         714
    vs diffusers' example: before 0.99x, now 1.42x, cached 1.81x (wall-clock the same to 0.01x);
  --threads 2: now 1.43x, cached 1.80x (1,439 / 1,007 / 799 ms). bf16 makes the text encoder 3.7x and
  the autoencoder's encoder 2.6x cheaper than fp32; the fp32 UNet step (73% of `now`, 93% of `cached`)
  is the same in every mode, which is what keeps both below the issue's 1.5x / 2.5x. With
  `--mixed-precision bf16` (the UNet autocast in every mode, diffusers' frozen encoders cast to bf16
  as its --mixed_precision does) see the README's throughput section.

Since then now/cached train the UNet as train_ldm's `small` preset does (fused AdamW, channels-last
weights; `--no-channels-last` keeps them contiguous, `--compile` compiles it). Quiet 2-core Xeon with
AMX (2026-12-03, nothing else running), `--steps 6 --warmup 2`, median wall ms per step (CPU time
the same to 1 ms at 1 thread):
    phase              diffusers      before         now      cached     (--threads 1)
    data/collate              19          10          13           2
    VAE encode               159         169          58           -
    text encode              457         468         120           -
    UNet fwd+bwd             673         691         667         669
    optimizer+EMA             54          47          29          29
    step                    1367        1385         885         700
    vs diffusers' example: before 0.99x, now 1.54x, cached 1.95x
  the same with --no-channels-last (the next run): UNet 694 / 699 ms, now 1.46x, cached 1.85x;
  --threads 2: diffusers 808, before 797, now 523, cached 405 ms: now 1.54x, cached 2.00x.
  channels-last takes ~4% off the fp32 `small` UNet step at 1 thread and the fused AdamW half the
  optimizer phase; the UNet phase is still 75% of `now` and 96% of `cached`, the same work as the
  example's, so cached stays below 2.5x at equal UNet precision. torch.compile of the channels-last
  fused `mini` step (`benchmarks.unet_cpu_options --preset mini --threads 2`): 130 vs 144 ms (1.11x)
  after 86 s of compiling, i.e. it pays back after ~6,000 steps, about all the demo trains (5,451
  in its last run): no gain there.
  `--threads 2 --compile` (the whole command 1m44s, compiling included): diffusers 866, now 529,
  cached 405 ms (now 1.64x, cached 2.14x), but the compiled UNet phase, 373-376 ms, is only 3% under
  the eager channels-last one of the run before (380-384 ms); the ratios rose mostly because the
  example's step was 7% slower in this run (866 vs 808 ms): run-to-run noise, not a 2.5x cached step.

What moved: the autoencoder's encoder in channels-last (VAE encode -27%), and with repeated captions
the deduplication (text encode 6.4x less). One tokenisation saves ~1.6 ms of ~680 (a 32-caption
batch: 3.6 vs 5.2 ms) and inference mode nothing measurable; the text encoder's fp32 forward (matmuls
62%, QuickGELU's mul/sigmoid 19%, attention 8% of it under torch.profiler) is what remains, and
bf16, the lever issue 18 counted on, is 1.3-1.5x slower than fp32 on this CPU (benchmarks/
text_encode.py): it pays only with AMX or a GPU. The UNet phase runs ~8% longer in our step than in
the example's on the same UNet (objective/caption dropout; not profiled further here).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from autoencoder.frozen import FrozenEncoder
from benchmarks.diffusers_reference import DiffusersStyleStep
from ldm.cache import CachedLatentLoader, CacheSpec, build_cache, open_cache, sample_latents
from ldm.conditioning import drop_captions, dropout_mask
from ldm.objective import DIFFUSION_PRESETS, DiffusionObjective
from ldm.unet import build_unet, unet_denoiser
from text_encoder import FrozenTextEncoder, load_text_encoder, resolve_dtype

RESOLUTION = 64
MODES = ("diffusers", "before", "now", "cached")
PHASES = ("data/collate", "VAE encode", "text encode", "UNet fwd+bwd", "optimizer+EMA")


def make_images(folder: Path, n: int, distinct_captions: int) -> None:
    """n random-colour gradient PNGs (80x64, so the loader really resizes and crops) with captions."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :80]
    for i in range(n):
        r, g, b = rng.integers(0, 256, size=3)
        pixels = np.stack([(xx * 3 + r) % 256, (yy * 3 + g) % 256, (xx + yy + b) % 256], -1).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.png")
        k = i % distinct_captions if distinct_captions else i
        (folder / f"img{i:04d}.txt").write_text(f"a gradient number {k} in colour {k % 7} {k % 5} {k % 3}",
                                                encoding="utf-8")


def clip_text_encoder(folder: Path) -> str:
    """A random 6-layer, 384-wide CLIPTextModel with open_clip's vocabulary at 77 tokens; its hf: spec."""
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    from text_encoder.openclip_backend import clip_tokenizer_from_open_clip

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                            max_position_embeddings=77)
    CLIPTextModel(config).save_pretrained(folder)
    clip_tokenizer_from_open_clip(open_clip.get_tokenizer("ViT-B-32"), 77).save_pretrained(folder)
    return f"hf:{folder}"


def legacy_encode(te: FrozenTextEncoder, captions: list[str]) -> torch.Tensor:
    """FrozenTextEncoder.encode as it was before issue 18 (fp32 model): hidden [B, 77, D]."""
    tokens = te.tokenizer(captions, padding="max_length", max_length=te.max_length, truncation=True,
                          return_tensors="pt")
    te.tokenizer(captions, truncation=False, verbose=False)  # the second pass that counted over-long prompts
    mask = tokens["attention_mask"]
    with torch.no_grad():
        return te.model(tokens["input_ids"], attention_mask=mask if te.uses_attention_mask else None)[0]


class Trained:
    """One trained UNet with its AdamW and EMA."""

    def __init__(self, unet: torch.nn.Module, fused: bool) -> None:
        self.unet = unet
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused)
        self.ema = [p.detach().clone() for p in unet.parameters()]
        self.denoiser = unet_denoiser(unet)


class Models:
    """The frozen stages (as before and as now), the trained UNets, the step's generator.

    ``before`` (and the diffusers step) train the contiguous fp32 UNet with the for-loop AdamW, as
    train_ldm did before issue 18; ``now`` trains an identical copy as train_ldm's `small` preset does:
    fused AdamW, channels-last weights unless ``channels_last`` is False, torch.compile if asked."""

    def __init__(self, text_spec: str, mixed_precision: str = "no", channels_last: bool = True,
                 compile: bool = False) -> None:
        torch.manual_seed(0)  # weights only; every draw in the steps uses self.generator
        self.autocast = mixed_precision == "bf16"  # train_ldm --run.mixed-precision bf16: autocast the UNet
        self.vae = build_autoencoder(AUTOENCODER_PRESETS["small"]).eval().requires_grad_(False)
        self.text_before = load_text_encoder(text_spec, dtype="fp32")
        self.text_now = load_text_encoder(text_spec, dtype="auto")
        self.vae_now = FrozenEncoder(self.vae, dtype=resolve_dtype("auto", "cpu"))
        self.null = self.text_before.null_embedding().hidden  # [1, 77, 384]
        self.unet = build_unet("small", cross_attention_dim=self.text_now.hidden_size).train()
        self.before = Trained(self.unet, fused=False)
        unet_now = copy.deepcopy(self.unet)
        if channels_last:  # train_ldm --channels-last: the same Parameters re-laid out, before the optimizer
            unet_now.to(memory_format=torch.channels_last)
        self.now = Trained(torch.compile(unet_now) if compile else unet_now, fused=True)
        self.objective = DiffusionObjective(DIFFUSION_PRESETS["sd_min_snr"])
        self.generator = torch.Generator().manual_seed(0)

    def train_step(self, latents: torch.Tensor, hidden: torch.Tensor, phase: Phases,
                   dropped: torch.Tensor | None = None, now: bool = True) -> None:
        """Caption dropout + UNet forward/backward on latents [B, 4, 16, 16], hidden [B, 77, 384]; AdamW + EMA.

        ``dropped`` [B]: the dropout mask already drawn (and applied) before encoding; None draws it here.
        ``now``: train_ldm's UNet as it trains now (False: as before issue 18)."""
        trained = self.now if now else self.before
        with phase("UNet fwd+bwd"):
            cond = hidden.float() if dropped is not None else drop_captions(hidden.float(), self.null.float(), 0.1,
                                                                            self.generator)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                loss, _ = self.objective.loss(trained.denoiser, latents, cond, self.generator)
            loss.backward()
        with phase("optimizer+EMA"):
            torch.nn.utils.clip_grad_norm_(trained.unet.parameters(), 1.0)
            trained.optimizer.step()
            trained.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(trained.ema, [p.detach() for p in trained.unet.parameters()], 1 - 0.999)


class Phases:
    """Per step: wall and CPU seconds of each phase (CPU time is steadier on a shared machine)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[float, float]]] = []

    def new_step(self) -> None:
        self.steps.append({})

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        w, c = self.steps[-1].get(name, (0.0, 0.0))
        self.steps[-1][name] = (w + time.perf_counter() - wall, c + time.process_time() - cpu)

    def median(self, name: str, which: int) -> float | None:
        values = [s[name][which] for s in self.steps if name in s]
        return statistics.median(values) if values else None

    def median_total(self, which: int) -> float:
        return statistics.median(sum(v[which] for v in s.values()) for s in self.steps)


def before_step(models: Models, loader: data.CaptionedLoader, phase: Phases) -> None:
    with phase("data/collate"):
        batch = next(loader)
    with phase("VAE encode"), torch.no_grad():
        latents = models.vae.encode(batch["pixel_values"]).latent_dist.sample(models.generator)  # [B, 4, 16, 16]
    with phase("text encode"):
        hidden = legacy_encode(models.text_before, list(batch["captions"]))  # [B, 77, 384]
    models.train_step(latents, hidden, phase, now=False)


def now_step(models: Models, loader: data.CaptionedLoader, phase: Phases) -> None:
    with phase("data/collate"):
        batch = next(loader)
    with phase("VAE encode"):
        latents = models.vae_now.encode(batch["pixel_values"]).latent_dist.sample(models.generator)
    with phase("text encode"):  # the dropout mask first: dropped captions are not encoded (ldm_stage.Batches)
        dropped = dropout_mask(len(batch["captions"]), 0.1, models.generator)  # [B]
        hidden = models.null.float().expand(len(dropped), -1, -1).clone()  # [B, 77, 384]
        kept = [c for c, d in zip(batch["captions"], dropped.tolist()) if not d]
        if kept:
            hidden[~dropped] = models.text_now.encode(kept).hidden.float()
    models.train_step(latents, hidden, phase, dropped)


def cached_step(models: Models, loader: CachedLatentLoader, phase: Phases) -> None:
    with phase("data/collate"):
        batch = next(loader)
        latents = sample_latents(batch["latent_mean"], batch["latent_std"], models.generator)  # [B, 4, 16, 16]
    models.train_step(latents, batch["text_hidden"], phase)


def profile_steps(steps: dict[str, Callable[[Phases], None]]) -> None:
    from torch.profiler import profile

    for name, step in steps.items():
        with profile() as prof:
            step(_fresh())
        print(f"\n--- torch.profiler, one {name} step (top operators by self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def _fresh() -> Phases:
    p = Phases()
    p.new_step()
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="generated training images")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes (on the fly)")
    parser.add_argument("--distinct-captions", type=int, default=0, help="captions repeat every N images; 0: all distinct")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables for one step per mode")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="bf16: every mode autocasts the UNet (train_ldm --run.mixed-precision bf16), and the "
                             "diffusers step casts its frozen encoders to bf16 as the example's --mixed_precision does")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="now/cached train a channels-last UNet, as train_ldm's `small` preset does "
                             "(--no-channels-last: contiguous, as before and diffusers)")
    parser.add_argument("--compile", action="store_true",
                        help="now/cached torch.compile the UNet (train_ldm --compile; compiles during warm-up)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache_dir = Path(tmp) / "images", Path(tmp) / "cache"
        folder.mkdir()
        make_images(folder, args.images, args.distinct_captions)
        models = Models(clip_text_encoder(Path(tmp) / "clip"), args.mixed_precision, args.channels_last, args.compile)
        cfg = data.DataConfig(source=str(folder), resolution=RESOLUTION, crop="center", flip=True)
        # The cache as train_ldm builds it: the frozen encoders in dtype=auto (bf16 with AMX), batches of 64.
        vae_fp = models.vae_now.fingerprint({"weights_sha256": "benchmark-random-small"})
        start = time.perf_counter()
        spec = CacheSpec(data=cfg, cache_dir=cache_dir, vae_fingerprint=vae_fp,
                         text_fingerprint=models.text_now.fingerprint, batch_size=64)
        build_cache(spec, vae=models.vae_now, text_encoder=models.text_now, rank=0, world_size=1, barrier=lambda: None)
        build_seconds = time.perf_counter() - start
        cache = open_cache(cache_dir, spec.key)
        loaders = {"before": data.build_loader(cfg, batch_size=args.batch_size, seed=0, num_workers=args.workers),
                   "now": data.build_loader(cfg, batch_size=args.batch_size, seed=0, num_workers=args.workers),
                   "cached": CachedLatentLoader(cache, batch_size=args.batch_size, seed=0)}  # fmt: skip
        iters = {name: iter(loader) for name, loader in loaders.items()}
        step_fns = {"before": before_step, "now": now_step, "cached": cached_step}
        steps = {m: (lambda p, m=m: step_fns[m](models, iters[m], p)) for m in MODES if m in step_fns}
        reference = DiffusersStyleStep(folder, models.unet, models.vae, models.text_before.model,
                                       models.text_before.tokenizer, RESOLUTION, args.batch_size, args.workers,
                                       mixed_precision=args.mixed_precision)
        steps["diffusers"] = reference.step
        steps = {m: steps[m] for m in MODES}
        for _ in range(args.warmup):
            for m in MODES:
                steps[m](_fresh())
        phases = {m: Phases() for m in MODES}
        for _ in range(args.steps):  # alternate step by step, so load bursts hit every mode
            for m in MODES:
                phases[m].new_step()
                steps[m](phases[m])
        if args.profile:
            profile_steps(steps)
    report(phases, build_seconds, models, args)


def report(phases: dict[str, Phases], build_seconds: float, models: Models, args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.workers} loader workers, batch "
          f"{args.batch_size}, {args.steps} steps per mode after {args.warmup} warm-up, {args.images} images at "
          f"{RESOLUTION} px, captions {'all distinct' if not args.distinct_captions else f'repeating every {args.distinct_captions}'}")
    print(f"frozen encoders now: text {models.text_now.dtype}, autoencoder {models.vae_now.dtype}; UNet "
          f"{'bf16 autocast (diffusers: encoders cast to bf16 too)' if args.mixed_precision == 'bf16' else 'fp32'}; "
          f"now/cached UNet {'channels-last' if args.channels_last else 'contiguous'}, fused AdamW"
          f"{', compiled' if args.compile else ''}")
    for which, label in ((0, "wall-clock"), (1, "CPU time of this process")):
        print(f"\nmedian ms per step, {label}:")
        print(f"  {'phase':<16}" + "".join(f"{m:>12}" for m in MODES))
        for name in PHASES:
            cells = [phases[m].median(name, which) for m in MODES]
            print(f"  {name:<16}" + "".join(f"{'-' if c is None else f'{c * 1e3:.0f}':>12}" for c in cells))
        totals = {m: phases[m].median_total(which) for m in MODES}
        print(f"  {'step':<16}" + "".join(f"{totals[m] * 1e3:>12.0f}" for m in MODES))
        print(f"  {'img/s':<16}" + "".join(f"{args.batch_size / totals[m]:>12.1f}" for m in MODES))
        print("  speed vs diffusers' example: " + ", ".join(f"{m} {totals['diffusers'] / totals[m]:.2f}x"
                                                          for m in MODES[1:])
              + f"; now / before {totals['before'] / totals['now']:.2f}x")
    saved_per_image = (phases["now"].median_total(0) - phases["cached"].median_total(0)) / args.batch_size
    payback = f"pays for itself after {build_seconds / saved_per_image:.0f} trained images" if saved_per_image > 0 else "no gain"
    print(f"\ncache build (both flips + text, encoders in {models.text_now.dtype}): {build_seconds:.1f} s for {args.images} "
          f"images ({args.images / build_seconds:.1f} img/s); {payback}")


if __name__ == "__main__":
    main()
