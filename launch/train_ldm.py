"""Stage 3: train a text-conditioned latent UNet on your autoencoder's latents.

    accelerate launch launch/train_ldm.py --preset small --data.source DATA --val-data VAL \
        --vae runs/vae/model --text-encoder minilm --cache-latents --cache-text --run.output-dir runs/ldm

Rerunning the same command resumes from the newest complete checkpoint. The result is
``OUTPUT/pipeline/``: a diffusers-layout pipeline folder that ``ldm-generate`` and stock
``StableDiffusionPipeline.from_pretrained`` both load.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # `python launch/train_ldm.py` / `accelerate launch launch/train_ldm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from autoencoder.folder import load_autoencoder
from data import DataConfig
from launch.evaluation.recognisability import quality_message
from launch.training import ldm_stage, unet_setup
from launch.training.accelerator import make_generators, setup_accelerator
from launch.training.checkpoint import TrainState
from launch.training.config import RunConfig, below, optimizer_problems
from launch.training.ema import EMA, PostHocEMAConfig, PowerEMA
from launch.training.ldm_stage import UNetStep
from launch.training.optim import GradScalerState, make_lr_schedule, make_unet_optimizer
from launch.training.run import TrainingRun, already_finished, check_resume
from ldm.cli import parse_config, to_dict
from ldm.conditioning import DEFAULT_P_UNCOND
from ldm.objective import DIFFUSION_PRESETS, DiffusionConfig, DiffusionObjective
from ldm.samplers import SAMPLERS
from ldm.unet import UNET_PRESETS, UNetConfig, unet_kwargs
from text_encoder import load_text_encoder


@dataclass
class TrainLDMConfig:
    """Train a text-conditioned UNet (stage 3) on the latents of a stage-1 autoencoder."""

    data: DataConfig = field(default_factory=lambda: DataConfig(resolution=64, missing_caption="empty"))
    """The training images and captions (--data SPEC is short for --data.source SPEC)."""
    val_data: str = ""
    """--data spec of a held-out set for the validation loss; empty: none."""
    vae: Path = Path("runs/vae/model")
    """A stage-1 output folder; its latent statistics are already folded into it."""
    text_encoder: str = "minilm"
    """Stage-2 spec: minilm, hf:NAME_OR_DIR, openclip:ARCH[@PRETRAINED] (options after '?')."""
    unet: UNetConfig = field(default_factory=lambda: UNET_PRESETS["small"])
    """Shape of the trained UNet (text width and latent channels come from stages 1 and 2)."""
    diffusion: DiffusionConfig = field(default_factory=lambda: DIFFUSION_PRESETS["sd"])
    """Noise schedule, prediction target and loss weighting."""
    p_uncond: float = DEFAULT_P_UNCOND
    """Caption dropout probability, for classifier-free guidance."""
    cache_latents: bool = False
    """Encode every image once (posterior mean and std) and train from the cache."""
    cache_text: bool = False
    """Also cache the text embeddings (implies --cache-latents)."""
    cache_dir: Path | None = None
    """Default: OUTPUT/cache. A cache built for other stages or data is refused, never reused."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir=Path("runs/ldm")))
    """Steps, batch, precision, checkpoints, logging: what every training run shares."""
    lr: float = 2e-4
    """Peak AdamW learning rate (after warmup)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (beta1, beta2)."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """muon: Muon (orthogonalised Nesterov momentum) for the UNet's weight matrices and convolution kernels, AdamW
    (with --lr, --adam-betas, --weight-decay) for biases, norms, conv_in, conv_out and LoRA adapters; same LR and schedule."""
    muon_momentum: float = 0.95
    """With --optimizer muon: Muon's momentum."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more time."""
    compile: bool = False
    """torch.compile the UNet (GPU; slow to start)."""
    channels_last: bool = False
    """Keep the UNet's convolution weights (and so its activations) in channels-last (NHWC) memory; checkpoints
    and exports are written contiguous as usual. On a CPU: 1.11x the `mini` step at 2 threads (AMX Xeon)."""
    val_every: int = 250
    """Held-out loss (with the EMA weights) every this many steps, and at the end."""
    val_samples: int = 256
    """Held-out images the validation loss uses (the first ones of --val-data)."""
    sample_every: int = 500
    """Sample grid for fixed prompts and seeds every this many steps, and at the end."""
    sample_prompts: tuple[str, ...] = ("grinning face", "cat face", "flag: japan", "red apple")
    """Prompts of the sample grid (one column each); empty: no grids."""
    sample_guidance: tuple[float, ...] = (1.0, 3.0, 6.0)
    """Guidance scales of the sample grid (one row each)."""
    sample_steps: int = 20
    """Sampler steps per grid image."""
    sampler: str = "dpmpp_2m"
    """The pipeline's default sampler (see ldm-generate --help)."""
    posthoc_ema: PostHocEMAConfig = field(default_factory=PostHocEMAConfig)
    """Post-hoc EMA (EDM2): snapshots in OUTPUT/posthoc_ema/, any EMA length rebuilt with launch/posthoc_ema.py."""
    eval_every: int = 0
    """Score recognisability (benchmarks/demo_quality.py's emoji classifier, EMA weights) every this many steps and at the end; 0: off."""
    eval_classifier: Path | None = None
    """With --eval-every: the classifier file benchmarks/demo_quality.py cached (cache/emoji_classifier/*.safetensors)."""
    eval_per_category: int = 4
    """With --eval-every: prompts per emoji category, from the training data (9 categories: 36 prompts at 4)."""
    eval_guidance: tuple[float, ...] = (4.0,)
    """With --eval-every: the guidance scales scored (sampler steps: --sample-steps)."""
    init_from: str = ""
    """Start from SRC's UNet: one of our pipeline folders, a stock StableDiffusionPipeline folder, a unet/ folder or hf:ORG/NAME. Its architecture replaces --unet; a fresh run starts at step 0, a rerun resumes from its own checkpoint."""
    allow_new_autoencoder: bool = False
    """With --init-from: train SRC's UNet on another autoencoder's latents than the one it learned."""
    lora_rank: int = 0
    """With --init-from: train rank-R LoRA adapters on the attention projections instead of the whole UNet (0: full)."""
    lora_alpha: float | None = None
    """LoRA scale numerator (updates are alpha/R * B A); None: alpha = R."""
    lora_merge: bool = False
    """LoRA runs: also export OUTPUT/pipeline_merged, the adapter folded into a full pipeline."""

    def __post_init__(self) -> None:
        # Every field checked here, at parse time; resolution against the autoencoder's factor once it is loaded.
        problems = optimizer_problems(self.lr, self.adam_betas, self.weight_decay)
        problems += below(self, 1, "val_every", "val_samples", "sample_every", "sample_steps") + below(self, 0, "lora_rank")
        if not 0.0 <= self.p_uncond <= 1.0:
            problems.append(f"p_uncond={self.p_uncond} must be in [0, 1]")
        if not all(math.isfinite(g) for g in self.sample_guidance):
            problems.append(f"sample_guidance={self.sample_guidance} must be finite numbers")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler={self.sampler!r} must be one of {', '.join(SAMPLERS)}")
        if self.eval_every < 0 or (self.eval_every and self.eval_classifier is None):
            problems.append(f"eval_every={self.eval_every} must be >= 0 and needs --eval-classifier FILE "
                            "(benchmarks/demo_quality.py trains and caches one)")
        if not 0.0 <= self.muon_momentum < 1.0:
            problems.append(f"muon_momentum={self.muon_momentum} must be in [0, 1)")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            problems.append(f"lora_alpha={self.lora_alpha} must be a positive number or None")
        if (self.cache_latents or self.cache_text) and self.data.shuffles_tags():
            problems.append("--data.shuffle-tags permutes tags anew each epoch on the fly, but the latent cache stores "
                            "each caption once in its stored order (and --cache-text one embedding of it): train "
                            "without --cache-latents/--cache-text, or without --data.shuffle-tags")
        if self.data.balance_by is not None and not self.cache_latents:
            problems.append(f"--data.balance-by {self.data.balance_by} draws samples by weight from the latent cache: "
                            "add --cache-latents")
        if self.data.resolution % self.unet.downsample_factor:
            problems.append(f"data.resolution={self.data.resolution} must be a multiple of {self.unet.downsample_factor} "
                            f"(the UNet's {len(self.unet.block_out_channels)} levels) times the autoencoder's factor")
        if problems:
            raise ValueError("Invalid train_ldm options: " + "; ".join(problems) + ".")


def _preset(unet: str, **kw) -> TrainLDMConfig:
    return dataclasses.replace(TrainLDMConfig(unet=UNET_PRESETS[unet]), **kw)


PRESETS: dict[str, TrainLDMConfig] = {
    "tiny": _preset("tiny", data=DataConfig(resolution=32, missing_caption="empty"), val_every=4, val_samples=8,
                    sample_every=8, sample_prompts=("a red disc",), sample_guidance=(1.0, 3.0), sample_steps=2,
                    run=RunConfig(max_steps=8, batch_size=4, warmup_steps=2, checkpoint_every=4, log_every=2,
                                  num_workers=0, ema_decay=0.9, report_to="none", lr_schedule="constant")),
    # The CPU demo: min-SNR weighting converges faster (Hang et al. 2023). Held-out loss after the
    # demo's 8 minutes on 2 cores (cached emoji latents, same VAE): batch 32 lr 1e-3 0.0879 (819
    # steps); batch 32 lr 2e-3 0.0851; batch 16 lr 1e-3 0.0861 and lr 2e-3 0.0920 (batch 16 uses two
    # threads worse); annealing the cosine fully within 820 steps 0.0945: the short run wants a high LR.
    # Since the equal-wall-clock sweep (benchmarks/recipe_sweep.py, README "Which stage-3 recipe"):
    # rectified flow with logit-normal t, an EMA of relative length 0.03 and the `compact` UNet
    # (more, cheaper steps) recognised 1.2x as often as eps + min-SNR on `small` (FD 12.9 vs 13.3).
    # Second sweep (quiet AMX CPU, equal wall-clock): the `mini` UNet (1.2 M) with 3,448 steps beat
    # `compact` with 1,500 (subcategory ratio 0.494 vs 0.401, FD 5.26 vs 6.59, 4 images per prompt).
    # Third sweep: (16,32,32), batch 64, pooled text, list captions, post-hoc EMA lengths 0.06/0.10,
    # logit-normal mean -0.5, uniform t and lr 3e-3 tie or lose. 3,450 steps took 7.6 minutes in one demo and hit the 9-minute cap at 3,425 in
    # another (the same CPU type, a slower host), so more steps would leave the cosine unfinished.
    # Eighth sweep (2-core EPYC, the demo's 3,077 AdamW steps of wall-clock): Muon for the weight matrices
    # and kernels (2,699 steps, it costs 1.10-1.19x a step) ends 0.022-0.027 lower in held-out loss in two
    # seeds (seed spread 0.005); its recognisability gain is within seed noise (two-seed means 0.463 / FD
    # 5.73 vs AdamW 0.447 / 6.03). lr 4e-3 and wd 0.1 tie, 8e-3 loses, batch 64 and (32,64,64) tie.
    "small": _preset("mini", lr=2e-3, diffusion=DIFFUSION_PRESETS["flow"], val_every=500, sample_every=1000,
                     channels_last=True, optimizer="muon",
                     run=RunConfig(output_dir=Path("runs/ldm"), max_steps=3450, batch_size=32, warmup_steps=50,
                                   checkpoint_every=500, log_every=50, ema_sigma_rel=0.03)),
    "sd15": _preset("sd15", data=DataConfig(resolution=512), lr=1e-4, val_every=2000, sample_every=2000,
                    run=RunConfig(max_steps=500_000, batch_size=16, mixed_precision="bf16", warmup_steps=10_000,
                                  ema_decay=0.9999, checkpoint_every=2000, log_every=100),
                    cache_latents=True, cache_text=True, text_encoder="hf:openai/clip-vit-large-patch14"),
}


def train(cfg: TrainLDMConfig) -> Path:
    run = cfg.run
    acc = setup_accelerator(run)
    out = Path(run.output_dir)
    if cfg.lora_rank and not cfg.init_from:
        raise SystemExit("--lora-rank adapts existing weights: give --init-from SRC (a pipeline or unet/ folder)")
    if already_finished(acc, out / "pipeline", run):
        return out / "pipeline"
    # Frozen stages 1 and 2.
    vae, contract = load_autoencoder(cfg.vae)
    # sample_size only tells diffusers the default image size: the training resolution in latents.
    cfg.unet = dataclasses.replace(cfg.unet, sample_size=cfg.data.resolution // contract.downsample_factor)
    vae.to(acc.device).eval().requires_grad_(False)
    text_encoder = load_text_encoder(cfg.text_encoder, device=acc.device, default_dtype="auto")  # ?dtype= wins
    null_hidden = text_encoder.null_embedding().hidden.to(acc.device, torch.float32)  # [1, L, D]

    # The trained stage: SRC's UNet (--init-from) or a fresh one, cross-attention width from the text encoder.
    unet, init = unet_setup.trained_unet(cfg, acc, text_encoder, contract)
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)  # the same Parameters, re-laid out: before the optimizer sees them
    # What the checkpoint's meaning depends on besides the config; a rerun that changed any is refused.
    stages = {"autoencoder": contract.to_json_dict(), "text_encoder": text_encoder.fingerprint,
              "unet": unet_kwargs(cfg.unet, text_encoder.hidden_size, contract.latent_channels)}
    check_resume(acc, run, config=to_dict(cfg), stages=stages)  # before the latent cache is touched
    batches = ldm_stage.Batches(cfg, acc, vae, text_encoder, contract.to_json_dict())
    objective = DiffusionObjective(cfg.diffusion)
    opt = make_unet_optimizer(unet, cfg.optimizer, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                              muon_momentum=cfg.muon_momentum, device=acc.device)
    if cfg.optimizer == "muon" and cfg.lora_rank:
        acc.print("--optimizer muon: LoRA adapters are low-rank factors, not whole weight matrices, so AdamW steps them")
    sched = make_lr_schedule(opt, run)
    unet, opt = acc.prepare(unet, opt)
    raw = acc.unwrap_model(unet)
    if cfg.compile:
        unet = torch.compile(unet)
    ema = EMA(raw, run.ema_decay, run.ema_sigma_rel).to(acc.device) if run.ema_decay > 0 else None
    phema = PowerEMA(raw, cfg.posthoc_ema.sigma_rels).to(acc.device) if cfg.posthoc_ema.snapshot_every else None

    gens = make_generators(run.seed, acc.process_index, ["latent", "dropout", "diffusion"], device="cpu")
    state = TrainState(
        modules={"unet": raw, **({"ema": ema} if ema else {}), **({"posthoc_ema": phema} if phema else {})},
        optimizers={"unet": opt},
        shared={"lr": sched, "grad_scaler": GradScalerState(acc)}, generators=gens,
        per_rank={"data": batches.loader},
    )
    tr = TrainingRun(acc, run, state, what="stage 3: UNet", config=to_dict(cfg), stages=stages)
    step = UNetStep(acc, unet, objective, opt, batches, null_hidden, cfg.p_uncond, gens, run, tr.guard)
    evaluator = ldm_stage.Evaluator(cfg, acc, vae, text_encoder, objective, out,
                                    bucket_histogram=getattr(batches.loader, "bucket_histogram", None))
    if init is not None:
        acc.print(f"--init-from {cfg.init_from} was not reapplied: resumed from this run's own checkpoint" if tr.resumed_from
                  else f"UNet from --init-from {cfg.init_from} ({init.source.kind}); the EMA starts from these weights")

    while tr.running:
        logs, applied = ldm_stage.train_step(step, tr.step)
        if applied:  # a skipped (non-finite) step advances neither the schedule nor the EMA
            sched.step()
            if ema is not None:
                ema.update(raw)
            if phema is not None:
                phema.update(raw)
        tr.end_step(logs)
        tr.log_training(lr=sched.get_last_lr()[0], show="loss")
        if tr.evaluation_due(cfg.val_every):
            scores = evaluator.validation_loss(unet, ema)
            tr.log_validation(scores, f"held-out loss {scores.get('val_loss', float('nan')):.4f}")
        if tr.evaluation_due(cfg.sample_every):
            tr.log_image("samples", evaluator.sample_grid(unet, ema, tr.step))
        if cfg.eval_every and tr.evaluation_due(cfg.eval_every):
            scores = evaluator.quality(unet, ema)
            tr.log_validation(scores, quality_message(scores))
        if phema is not None and tr.due(cfg.posthoc_ema.snapshot_every) and acc.is_main_process:
            phema.save_snapshot(out / "posthoc_ema", tr.step)
        tr.save_checkpoint_if_due()
    tr.end_loop(raw, "UNet")
    if tr.preempted:
        tr.exit_preempted()

    training_config = {**to_dict(cfg), **({"init_from_source": init.source.record()} if init else {})}
    if cfg.lora_rank:
        folder = unet_setup.export_lora(cfg, acc, unet, ema, vae, text_encoder, objective, out, training_config)
    else:
        folder = ldm_stage.export(cfg, acc, unet, ema, vae, text_encoder, objective, out, training_config)
    tr.mark_finished(folder)
    if acc.is_main_process:
        ldm_stage.plot(out)
    tr.close()
    return folder


def main(args: list[str] | None = None) -> None:
    train(parse_config(TrainLDMConfig, PRESETS, args=args, default_preset="small"))


if __name__ == "__main__":
    main()
