"""Stage-3 recipes compared on the emoji set: same autoencoder, same latent cache, same step budget.

    python benchmarks/recipe_sweep.py --variants today flow flow_attn16 --out runs/sweep
    python benchmarks/recipe_sweep.py --variants today flow --steps 600 --parallel 2 --threads 1

Every variant trains `launch/train_ldm.py --preset small` on ``--data`` with the autoencoder
``--vae`` and one shared ``--cache-dir`` (latents and text are encoded once for all variants that
share a text encoder), for ``--steps`` steps whose LR schedule follows the demo's (cosine over
``--schedule-steps``, which the time-capped demo stops early). Variants that change the cost of a
step are given their step count from the measured seconds per step (``steps_scale``, from a short
interleaved timing on a quiet machine), so every variant gets the same wall-clock of training: a
fixed step count keeps the comparison fair when the machine is shared, where a wall-clock budget
would not be. Each finished pipeline is then scored by ``benchmarks/demo_quality.py`` (its
classifier cached once) at ``--guidance``; the table and a JSON of every number go to ``--out``.
A variant whose pipeline already exists is scored, not retrained (delete its folder to rerun).

The held-out loss (EMA weights, fixed noise and timesteps) is comparable only between variants of
the same objective: a velocity MSE (flow) is not an epsilon MSE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/recipe_sweep.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli import parse_config

FLOW = ["--diffusion.schedule.prediction-type", "flow_prediction", "--diffusion.timestep-sampling", "logit_normal",
        "--diffusion.min-snr-gamma", "None"]
ATTN16 = ["--unet.attention-levels", "True", "True", "True"]  # tuple[bool, ...] fields take values
EMA03 = ["--run.ema-sigma-rel", "0.03"]
# Seconds per step relative to `small` (UNet forward + backward + AdamW, batch 32, 16x16x4 latents,
# 24 text tokens, 1 thread, medians of 5 interleaved rounds of benchmarks/unet_step_cost.py, machine shared):
# attention also at 16x16 1.58, channels (48, 96, 96) 0.69.
ATTN16_COST, C48_COST = 1.58, 0.69
# Relative to `compact` (the same tool, 9 interleaved rounds, 1 thread, quiet 2-core Xeon with AMX):
# `small` 1.52 (compact 0.66x of it), pooled text 1.01, channels (32,64,64) 0.57, batch 16 0.56 per step.
SMALL_OVER_COMPACT, POOLED_COST, C32_COST, B16_COST = 1.52, 1.01, 0.57, 0.56
C24_COST, C32_POOLED_COST = 0.435, 0.60  # (24,48,48) with 8 groups; (32,64,64) with pooled text
C32 = ("--unet.block-out-channels", "32", "64", "64")
# Relative to `mini` at 2 threads, what the demo trains with (quiet AMX Xeon, 8 interleaved rounds of
# unet_step_cost.py --threads 2; at 1 thread the small UNets gain less from the second core):
# `small` 2.91 (mini 0.343x of it), pooled text 1.07, channels (16,32,32) 0.70, batch 64 1.61 per step.
MINI_OVER_SMALL, MINI_POOLED_COST, C16_COST, MINI_B64_COST = 0.343, 1.07, 0.70, 1.61
# Fifth sweep (quiet AMX Xeon, unet_step_cost.py --threads 2 --rounds 10): AdaGN 1.01 (mini 0.137 s,
# scale-shift 0.138 s), 2 heads 0.93 (0.128 s) per step.
MINI_SS_COST, MINI_HEADS2_COST = 1.0, 0.93
BALANCE = ("--data.balance-by", "base")
# Eighth sweep (2-core AVX512-BF16 EPYC, mini, batch 32, 7 interleaved rounds of 5 steps): Muon for the
# weight matrices and kernels costs 1.11x AdamW's step at 1 thread (272 vs 246 ms), 1.14x at 2 (229 vs 200);
# a second, quiet run at 2 threads: mini 176 ms, mini + Muon 1.10x, (32,64,64) 1.27x, (32,64,64) + Muon 1.54x.
# A third (7 rounds of 5 steps, 2 threads): mini 188 ms, + Muon 1.24x, batch 64 1.69x, batch 64 + Muon 1.77x.
# A fourth (6 rounds): mini 175 ms, + Muon 1.16x, batch 128 3.41x, batch 128 + Muon 3.32x.
MUON_COST, C32_MUON_COST, B64_MUON_COST, B128_MUON_COST = 1.14, 1.54, 1.77, 3.4
OLD_ARGS = ("--diffusion.schedule.prediction-type", "epsilon", "--diffusion.timestep-sampling", "uniform",
            "--diffusion.min-snr-gamma", "5", "--run.ema-sigma-rel", "0", "--unet.block-out-channels", "64",
            "128", "128", "--unet.norm-num-groups", "32")

# Training images per category of the emoji split (`python benchmarks/split_by_field.py --field category`).
BY_CATEGORY = "runs/sweep/by_category"
CATEGORIES = {"activities": 76, "animals-nature": 144, "component": 4, "flags": 243, "food-drink": 117,
              "objects": 238, "people-body": 2042, "smileys-emotion": 153, "symbols": 201, "travel-places": 197}


@dataclass(frozen=True)
class Variant:
    args: tuple[str, ...]
    """Extra train_ldm arguments on top of the demo's."""
    about: str
    """What the variant changes, for the table."""
    steps_scale: float = 1.0
    """Steps relative to --steps (seconds per step of `today` / of this variant, measured)."""
    data: str = ""
    """Other training data than --data (with its own latent cache); the benchmark still uses --data."""
    sources: tuple[str, ...] = ()
    """A mix (`--data.sources`) instead of --data, with its own latent cache (e.g. from split_by_field.py)."""
    optimizer: str = "adamw"
    """train_ldm --optimizer (given explicitly: the `small` preset trains with Muon since the eighth sweep, the
    variants before it with AdamW)."""
    cache: str = ""
    """A suffix for a latent cache of its own (shared by the variants with the same suffix): --data.balance-by
    stores the field in the cache, so balanced variants cannot read the plain one."""


VARIANTS: dict[str, Variant] = {
    "today": Variant((), "the demo's recipe: eps, min-SNR 5, uniform t, lr 2e-3, EMA 0.999"),
    "flow": Variant(tuple(FLOW) + ("--posthoc-ema.snapshot-every", "100"),
                    "rectified flow, velocity target, logit-normal(0, 1) t"),
    "flow_lr3e-3": Variant(tuple(FLOW) + ("--lr", "3e-3"), "flow, lr 3e-3"),
    "flow_lr4e-3": Variant(tuple(FLOW) + ("--lr", "4e-3"), "flow, lr 4e-3"),
    "flow_base": Variant(tuple(FLOW), "flow, base emoji only (no skin-tone variants: 1,720 of 3,415 images)",
                         data="runs/sweep/data_base"),
    "flow_lr1e-3": Variant(tuple(FLOW) + ("--lr", "1e-3"), "flow, lr 1e-3"),
    "vpred": Variant(("--diffusion.schedule.prediction-type", "v_prediction", "--diffusion.schedule.zero-terminal-snr"), "v-prediction, zero terminal SNR, min-SNR 5"),
    "flow_ema9995": Variant(tuple(FLOW) + ("--run.ema-decay", "0.9995"), "flow, EMA 0.9995"),
    "flow_ema995": Variant(tuple(FLOW) + ("--run.ema-decay", "0.995"), "flow, EMA 0.995"),
    "flow_b64": Variant(tuple(FLOW) + ("--run.batch-size", "64", "--lr", "3e-3"), "flow, batch 64, lr 3e-3",
                        steps_scale=0.5),
    "flow_ema03": Variant(tuple(FLOW) + ("--run.ema-sigma-rel", "0.03"), "flow, EMA of relative length 0.03"),
    "flow_ema03_b99": Variant(tuple(FLOW) + ("--run.ema-sigma-rel", "0.03", "--adam-betas", "0.9", "0.99"),
                              "flow, EMA 0.03, Adam beta2 0.99"),
    "today_ema03": Variant(("--run.ema-sigma-rel", "0.03"), "today's recipe with an EMA of relative length 0.03"),
    "flow_ema03_attn16": Variant(tuple(FLOW + EMA03 + ATTN16), "flow, EMA 0.03, attention also at 16x16",
                                 steps_scale=1 / ATTN16_COST),
    "flow_ema03_c48": Variant(tuple(FLOW + EMA03) + ("--unet.block-out-channels", "48", "96", "96",
                                                     "--unet.norm-num-groups", "16"),
                              "flow, EMA 0.03, channels (48, 96, 96) (4.2 M)", steps_scale=1 / C48_COST),
    "today_captions": Variant((), "today's recipe, list captions from emoji.json (prepare_data --emoji-captions "
                              "variants: name, short names, 'flag: x', name + subcategory + category)",
                              data="runs/sweep/data_var/train"),
    "flow_ema03_captions": Variant(tuple(FLOW + EMA03), "flow, EMA 0.03, list captions (as today_captions)",
                                   data="runs/sweep/data_var/train"),
    "flow_ema03_c48_captions": Variant(tuple(FLOW + EMA03) + ("--unet.block-out-channels", "48", "96", "96",
                                                              "--unet.norm-num-groups", "16"),
                                       "flow_ema03_c48 with list captions (as today_captions)",
                                       steps_scale=1 / C48_COST, data="runs/sweep/data_var/train"),
    # Relative to the `small` preset since the sweep above (flow, EMA 0.03, `compact` UNet): run these
    # with --steps set to what that preset trains in the demo's minutes.
    "now": Variant((), "the demo's recipe since the first sweep: flow, EMA 0.03, compact (48,96,96) UNet"),
    "old": Variant(OLD_ARGS, "the recipe before the first sweep (the `today` row) at the same wall-clock as `now`",
                   steps_scale=1 / SMALL_OVER_COMPACT),
    "now_b16": Variant(("--run.batch-size", "16", "--lr", "1.5e-3"), "now at batch 16 (lr 1.5e-3), more steps",
                       steps_scale=1 / B16_COST),
    "now_c32": Variant(C32, "now with channels (32,64,64) (2.0 M), more steps", steps_scale=1 / C32_COST),
    "now_c32_lr3e-3": Variant(C32 + ("--lr", "3e-3"), "now_c32 at lr 3e-3", steps_scale=1 / C32_COST),
    "now_c32_pooled": Variant(C32 + ("--unet.pooled-text",), "now_c32 with pooled text (2.5 M)",
                              steps_scale=1 / C32_POOLED_COST),
    "now_c24": Variant(("--unet.block-out-channels", "24", "48", "48", "--unet.norm-num-groups", "8"),
                       "now with channels (24,48,48), 8 groups (1.2 M), more steps", steps_scale=1 / C24_COST),
    "now_pooled": Variant(("--unet.pooled-text",), "now + attention-pooled text added to the timestep "
                          "embedding (UNetConfig.pooled_text; every ResNet block sees the prompt)",
                          steps_scale=1 / POOLED_COST),
    "now_pooled_captions": Variant(("--unet.pooled-text",), "now_pooled with list captions (as today_captions)",
                                   data="runs/sweep/data_var/train"),
    "now_pooled_p2": Variant(("--unet.pooled-text", "--p-uncond", "0.2"), "now_pooled, caption dropout 0.2"),
    # Relative to the `small` preset since the second sweep (flow, EMA 0.03, `mini` UNet): run these with
    # --steps/--schedule-steps 3450, what the preset trains in the demo.
    "m": Variant(("--posthoc-ema.snapshot-every", "345"),
                 "the demo's recipe since the second sweep: flow, EMA 0.03, mini (24,48,48) UNet (1.2 M); stores "
                 "post-hoc EMA snapshots (launch/posthoc_ema.py rebuilds other EMA lengths from them)"),
    "m_old": Variant(OLD_ARGS, "the recipe before the first sweep (eps, min-SNR 5, EMA 0.999 warm-up, `small` "
                     "7.2 M) at the same wall-clock as `m`", steps_scale=MINI_OVER_SMALL),
    "m_b64": Variant(("--run.batch-size", "64"), "m at batch 64 (lr 2e-3), fewer steps", steps_scale=1 / MINI_B64_COST),
    "m_c16": Variant(("--unet.block-out-channels", "16", "32", "32"), "m with channels (16,32,32) (0.6 M), more steps",
                     steps_scale=1 / C16_COST),
    "m_pooled": Variant(("--unet.pooled-text",), "m with pooled text (1.7 M)", steps_scale=1 / MINI_POOLED_COST),
    "m_captions": Variant((), "m with list captions (as today_captions)", data="runs/sweep/data_var/train"),
    "m_lm-0.5": Variant(("--diffusion.logit-mean", "-0.5"), "m with training t from logit-normal(-0.5, 1) (less noise)"),
    "m_lm0.5": Variant(("--diffusion.logit-mean", "0.5"), "m with training t from logit-normal(0.5, 1) (more noise)"),
    "m_ls1.5": Variant(("--diffusion.logit-std", "1.5"), "m with training t from logit-normal(0, 1.5) (wider)"),
    "m_uniform": Variant(("--diffusion.timestep-sampling", "uniform"), "m with uniform training t"),
    "m_lr3e-3": Variant(("--lr", "3e-3"), "m at lr 3e-3"),
    "m_cat": Variant((), "m with every emoji category an equal share of the batches (component 0.5%): one "
                     "shard folder per category (split_by_field.py), mixed by --data.sources weights",
                     sources=tuple(f"{BY_CATEGORY}/{c}#weight={1 if c != 'component' else 0.05}" for c in CATEGORIES)),
    "m_cat_sqrt": Variant((), "m with each category's share of the batches proportional to the square root of its "
                          "size (people & body 30% instead of 60%)",
                          sources=tuple(f"{BY_CATEGORY}/{c}#weight={n ** 0.5:.4g}" for c, n in CATEGORIES.items())),
    # Fifth sweep (quiet AMX Xeon, the demo's fitted step count): run with --steps/--schedule-steps N.
    "m_ss": Variant(("--unet.scale-shift",), "m with AdaGN: the timestep embedding scales and shifts the ResNet "
                    "blocks' normalised features (resnet_time_scale_shift)", steps_scale=1 / MINI_SS_COST),
    "m_heads2": Variant(("--unet.num-heads", "2"), "m with 2 attention heads of 24 channels instead of 4 of 12",
                        steps_scale=1 / MINI_HEADS2_COST),
    "m_p05": Variant(("--p-uncond", "0.05"), "m with 5% caption dropout instead of 10%"),
    "m_bal": Variant(BALANCE, "m drawing every base emoji (with its skin-tone variants) equally often: "
                     "--data.balance-by base", cache="bal"),
    "m_bal_sqrt": Variant(BALANCE + ("--data.balance-power", "0.5"), "m_bal with weight 1 / sqrt(images of its "
                          "base emoji): a base emoji's share grows with the square root of its variants", cache="bal"),
    "m_bal_c32": Variant(BALANCE + C32, "m_bal with channels (32,64,64), 2.0 M, fewer steps",
                         steps_scale=C24_COST / C32_COST, cache="bal"),
    "m_bal_muon": Variant(BALANCE, "m_bal with Muon (orthogonalised momentum) for the weight matrices and "
                          "kernels, AdamW for the rest, lr 2e-3", steps_scale=1 / MUON_COST, cache="bal", optimizer="muon"),
    "m_bal_muon_lr4e-3": Variant(BALANCE + ("--lr", "4e-3"), "m_bal_muon at lr 4e-3",
                                 steps_scale=1 / MUON_COST, cache="bal", optimizer="muon"),
    "m_bal_muon_lr8e-3": Variant(BALANCE + ("--lr", "8e-3"), "m_bal_muon at lr 8e-3",
                                 steps_scale=1 / MUON_COST, cache="bal", optimizer="muon"),
    "m_bal_muon_c32": Variant(BALANCE + C32, "m_bal_muon with channels (32,64,64), 2.0 M, fewer steps",
                              steps_scale=1 / C32_MUON_COST, cache="bal", optimizer="muon"),
    "m_bal_muon_b64": Variant(BALANCE + ("--run.batch-size", "64"), "m_bal_muon at batch 64, fewer steps",
                              steps_scale=1 / B64_MUON_COST, cache="bal", optimizer="muon"),
    "m_bal_s1": Variant(BALANCE + ("--run.seed", "1"), "m_bal (AdamW) with seed 1", cache="bal"),
    "m_bal_muon_s1": Variant(BALANCE + ("--run.seed", "1"), "m_bal_muon with seed 1", steps_scale=1 / MUON_COST,
                             cache="bal", optimizer="muon"),
    "m_bal_muon_b64_s1": Variant(BALANCE + ("--run.batch-size", "64", "--run.seed", "1"),
                                 "m_bal_muon_b64 with seed 1 (another initialisation and draw order)",
                                 steps_scale=1 / B64_MUON_COST, cache="bal", optimizer="muon"),
    "m_bal_muon_b128": Variant(BALANCE + ("--run.batch-size", "128"), "m_bal_muon at batch 128, fewer steps",
                               steps_scale=1 / B128_MUON_COST, cache="bal", optimizer="muon"),
    "m_bal_muon_wd0.1": Variant(BALANCE + ("--weight-decay", "0.1"), "m_bal_muon with weight decay 0.1",
                                steps_scale=1 / MUON_COST, cache="bal", optimizer="muon"),
    "flow_const": Variant(tuple(FLOW) + ("--run.lr-schedule", "constant"), "flow, constant LR after warmup"),
    "flow_anneal": Variant(tuple(FLOW) + ("--run.lr-schedule-steps", "0"), "flow, cosine annealed to 0 at the end"),
}


@dataclass
class SweepConfig:
    """Train each stage-3 variant at the same step budget on one cache and score it."""

    variants: tuple[str, ...] = ("today", "flow")
    """Which of VARIANTS to run (see the source for their arguments)."""
    out: Path = Path("runs/sweep")
    """One folder per variant, plus sweep.json and sweep.md."""
    vae: Path = Path("runs/demo/vae/model")
    """The stage-1 autoencoder every variant shares (the demo's)."""
    data: str = "runs/demo/data/train"
    """Training data (the emoji set from `prepare_data.py --emoji`)."""
    val_data: str = "runs/demo/data/val"
    """Held-out data for the held-out loss."""
    text_encoder: str = "minilm?max_length=24"
    """The demo's text encoder."""
    steps: int = 600
    """Steps per variant (the demo trains ~600 in its 8 minutes on 2 cores)."""
    schedule_steps: int = 1500
    """The cosine schedule's horizon (the demo's max_steps, reached by no time-capped run)."""
    threads: int = 1
    """Torch threads per training process."""
    parallel: int = 2
    """Variants trained at the same time (threads x parallel should be the machine's cores)."""
    guidance: tuple[float, ...] = (1.0, 4.0)
    """Guidance scales the benchmark scores."""
    extra: tuple[str, ...] = ()
    """More train_ldm arguments for every variant."""
    quality_args: tuple[str, ...] = ()
    """More demo_quality arguments (e.g. --sampler)."""
    cache_dir: Path | None = None
    """The shared latent + text cache (default: OUT/cache); a new one after the demo rebuilt its data,
    whose old cache train_ldm refuses as stale."""


def cache_of(cfg: SweepConfig, name: str) -> Path:
    """The latent cache variant `name` trains from."""
    v = VARIANTS[name]
    base = cfg.cache_dir if cfg.cache_dir is not None else cfg.out / "cache"
    if v.data or v.sources:
        return base.with_name(f"{base.name}_{name}")
    return base.with_name(f"{base.name}_{v.cache}") if v.cache else base


def train_command(cfg: SweepConfig, name: str) -> list[str]:
    v = VARIANTS[name]
    cache = cache_of(cfg, name)
    data = ["--data.sources", *v.sources] if v.sources else ["--data", v.data or cfg.data]
    steps = max(1, round(cfg.steps * v.steps_scale))
    schedule = max(1, round(cfg.schedule_steps * v.steps_scale))
    return [sys.executable, "launch/train_ldm.py", "--preset", "small", *data, "--val-data", cfg.val_data,
            "--vae", str(cfg.vae), "--text-encoder", cfg.text_encoder, "--cache-latents", "--cache-text",
            "--cache-dir", str(cache), "--run.output-dir", str(cfg.out / name),
            "--run.max-steps", str(steps), "--run.lr-schedule-steps", str(schedule), "--run.num-workers", "0",
            "--run.checkpoint-every", str(steps), "--sample-every", str(steps), "--run.report-to", "none",
            "--optimizer", v.optimizer, *cfg.extra, *v.args]


def env_for(cfg: SweepConfig) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train_all(cfg: SweepConfig, names: list[str]) -> dict[str, float]:
    """Train the variants without a pipeline, `parallel` at a time; {name: wall seconds}."""
    todo = [n for n in names if not (cfg.out / n / "pipeline" / "finished.json").exists()]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    seconds: dict[str, float] = {}
    cfg.out.mkdir(parents=True, exist_ok=True)

    def can_start(name: str) -> bool:  # a cache is built by one variant alone, so builds do not race
        cache = cache_of(cfg, name)
        return (cache / "cache_manifest.json").exists() or all(cache_of(cfg, r) != cache for r in running)

    while todo or running:
        while len(running) < cfg.parallel and any(can_start(n) for n in todo):
            name = next(n for n in todo if can_start(n))
            todo.remove(name)
            log = open(cfg.out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            print(f"[sweep] training {name}: {' '.join(train_command(cfg, name)[2:])}", flush=True)
            running[name] = (subprocess.Popen(train_command(cfg, name), stdout=log, stderr=subprocess.STDOUT,
                                              env=env_for(cfg)), time.time())
        time.sleep(5)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                seconds[name] = time.time() - start
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {cfg.out}/{name}.log)"
                print(f"[sweep] {name} {status} in {seconds[name] / 60:.1f} min", flush=True)
    return seconds


def last_val_loss(folder: Path) -> tuple[int, float | None]:
    step, loss = 0, None
    path = folder / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("kind") == "val" and "val_loss" in row:
                step, loss = row["step"], row["val_loss"]
    return step, loss


def score(cfg: SweepConfig, name: str) -> dict | None:
    pipe = cfg.out / name / "pipeline"
    if not (pipe / "finished.json").exists():
        return None
    out = cfg.out / name / "quality.json"
    if not out.exists():
        cmd = [sys.executable, "benchmarks/demo_quality.py", "--model", str(pipe), "--data", cfg.data,
               "--val-data", "", "--guidance", *map(str, cfg.guidance), "--json", str(out), *cfg.quality_args]
        subprocess.run(cmd, check=True, env={**env_for(cfg), "OMP_NUM_THREADS": str(cfg.threads * cfg.parallel)})
    return json.loads(out.read_text(encoding="utf-8"))


def table(cfg: SweepConfig, names: list[str]) -> tuple[str, dict]:
    head = "| variant | what | steps | held-out loss | " + " | ".join(
        f"sub ratio g{g:g} | cat ratio g{g:g} | FD g{g:g}" for g in cfg.guidance) + " |"
    lines = [head, "|" + "---|" * (4 + 3 * len(cfg.guidance))]
    everything = {}
    for name in names:
        q = score(cfg, name)
        step, loss = last_val_loss(cfg.out / name)
        everything[name] = {"args": list(VARIANTS[name].args), "optimizer": VARIANTS[name].optimizer, "steps": step, "val_loss": loss, "quality": q}
        if q is None:
            lines.append(f"| {name} | {VARIANTS[name].about} | {step} | - | failed |")
            continue
        cells = []
        for g in cfg.guidance:
            r = next(v for k, v in q["guidance"].items() if float(k) == g)
            cells += [f"{r['subcategory_ratio']:.3f}", f"{r['category_ratio']:.3f}", f"{r['fd']:.2f}"]
        lines.append(f"| {name} | {VARIANTS[name].about} | {step} | {loss:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines), everything


def main(args: list[str] | None = None) -> None:
    cfg = parse_config(SweepConfig, args=args)
    unknown = [n for n in cfg.variants if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    names = list(cfg.variants)
    train_all(cfg, names)
    text, everything = table(cfg, names)
    print(text)
    (cfg.out / "sweep.md").write_text(text + "\n", encoding="utf-8")
    (cfg.out / "sweep.json").write_text(json.dumps(everything, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
