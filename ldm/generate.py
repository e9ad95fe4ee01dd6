"""ldm-generate: text-to-image from a saved pipeline folder.

    ldm-generate --model runs/demo/ldm/pipeline --prompt "a yellow smiling face" --num-images 4 --grid
    ldm-generate --config gen.json --prompt "a red flag" --sampler euler_a --steps 30 --seed 7

Every PNG records, in its text chunks, the prompt, negative prompt, seed, sampler, steps, guidance
and the model's manifest id, so any image can be regenerated exactly: image k of a run uses seed
``--seed + k`` (on the same device, same seed and settings give the same image). The command runs
``LatentDiffusionPipeline.generate``, the same code path as the Python API.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from ldm.cli import ConfigError, parse_config, save_config
from ldm.manifest import PipelineFolderError
from ldm.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, GeneratedImage, LatentDiffusionPipeline
from ldm.samplers import SAMPLERS, build_sampler

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerateConfig:
    """Generate images from a trained latent diffusion pipeline folder."""

    model: Path | None = None
    """Pipeline folder (written by training / save_pretrained)."""
    prompt: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """A prompt; give it several times for several."""
    prompts_file: Path | None = None
    """One prompt per line (blank lines skipped); added after --prompt."""
    negative_prompt: str | None = None
    """Negative prompt for every image (the unguided branch); None: the model's null embedding."""
    num_images: int = 1
    """Images per prompt (at least 1)."""
    steps: int = DEFAULT_STEPS
    """Sampler steps (at least 1)."""
    sampler: str | None = None
    """ddpm ddim euler euler_a heun dpmpp_2m dpmpp_2m_karras unipc (a flow model refuses ddpm, ddim,
    euler_a and dpmpp_2m_karras); None: the model's default."""
    guidance: float = DEFAULT_GUIDANCE
    """Classifier-free guidance scale (a finite number); 1 = no guidance, 0 = unconditional."""
    guidance_rescale: float = 0.0
    """Lin et al. 2023 guidance rescale, in [0, 1]."""
    seed: int = 0
    """Image k uses seed + k."""
    height: int | None = None
    """Image height in pixels; default: the UNet's sample_size x the autoencoder factor."""
    width: int | None = None
    """Image width in pixels; default as for height."""
    batch_size: int = 4
    """Images per sampler call (at least 1); does not change the images."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights and activations dtype (float16 only on cuda)."""
    out: Path = Path("samples")
    """Output folder for the PNGs, grid.png and generate_config.json (created if missing)."""
    grid: bool = False
    """Also write grid.png: one row per prompt (several prompts of one image each: a square)."""
    verify: bool = True
    """Re-hash the model folder's files against its manifest before loading."""
    lora: Path | None = None
    """A LoRA adapter folder (pytorch_lora_weights.safetensors, as train_ldm --lora-rank exports) applied to the UNet."""
    lora_scale: float = 1.0
    """Strength of --lora: 0 is the base model, 1 the adapter as trained."""

    def __post_init__(self) -> None:
        for name in ("num_images", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not math.isfinite(self.guidance):
            raise ConfigError(f"--guidance must be a finite number (1 = no guidance), not {self.guidance}")
        if not 0.0 <= self.guidance_rescale <= 1.0:  # also refuses nan
            raise ConfigError(f"--guidance-rescale must be in [0, 1], not {self.guidance_rescale}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be a positive number of pixels, not {value}")
        if not math.isfinite(self.lora_scale):
            raise ConfigError(f"--lora-scale must be a finite number, not {self.lora_scale}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")


def check_output_folder(out: Path) -> None:
    """Refuse an --out that cannot be written before any model is loaded or image made.

    Not in ``__post_init__``: the default config is built before the command line is read, and a
    read-only working directory must not fail a run whose --out points elsewhere."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder; give a folder path")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so the folder cannot be created there")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write in {parent} ({e.strerror}); choose a writable folder") from None


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompts_file is not None:
        if not cfg.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {cfg.prompts_file}: no such file")
        lines = cfg.prompts_file.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def resolve_device(name: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if name == "cpu" and dtype == "float16":
        raise ConfigError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    return torch.device(name), _DTYPES[dtype]


def png_metadata(item: GeneratedImage, cfg: GenerateConfig, sampler: str, manifest_id: str | None) -> PngInfo:
    """Text chunks that are enough to regenerate this image from the same model folder."""
    fields = {
        "prompt": item.prompt,
        "negative_prompt": item.negative_prompt or "",
        "seed": item.seed,
        "sampler": sampler,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "guidance_rescale": cfg.guidance_rescale,
        "size": f"{item.image.width}x{item.image.height}",
        "model_manifest_id": manifest_id or "",
    }
    if cfg.lora is not None:  # the adapter is part of the model that made the image
        fields.update(lora=str(cfg.lora), lora_scale=cfg.lora_scale)
    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, str(value))
    info.add_text("ldm_generate", json.dumps(fields))
    return info


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def run(cfg: GenerateConfig) -> list[Path]:
    """Generate and write the PNGs (and the grid); returns the paths of the images written."""
    if cfg.model is None:
        raise ConfigError("--model DIR is required: the pipeline folder to sample from")
    prompts = read_prompts(cfg)
    check_output_folder(cfg.out)
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    pipe = LatentDiffusionPipeline.from_pretrained(cfg.model, device=device, dtype=dtype, verify=cfg.verify)
    if cfg.lora is not None:
        from ldm.lora import load_lora

        load_lora(pipe.unet, cfg.lora, cfg.lora_scale)
    sampler = cfg.sampler or pipe.default_sampler
    build_sampler(sampler, pipe.schedule)  # e.g. heun on a zero-SNR model: refuse before any output
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out / "generate_config.json")
    # Image k (prompt-major order) uses seed + k whatever the batching, so a batch of consecutive
    # images is one generate() call with seed + first.
    flat = [p for p in prompts for _ in range(cfg.num_images)]
    paths, images = [], []
    with tqdm(total=len(flat), desc="images", unit="img") as bar:
        for first in range(0, len(flat), cfg.batch_size):
            chunk = flat[first : first + cfg.batch_size]
            batch = pipe.generate(
                chunk, negative_prompt=cfg.negative_prompt, steps=cfg.steps, sampler=sampler,
                guidance_scale=cfg.guidance, guidance_rescale=cfg.guidance_rescale, seed=cfg.seed + first,
                height=cfg.height, width=cfg.width, batch_size=len(chunk), progress=True,
            )  # fmt: skip
            for k, item in enumerate(batch, start=first):
                path = cfg.out / f"{k:05d}-seed{item.seed}.png"
                item.image.save(path, pnginfo=png_metadata(item, cfg, sampler, pipe.manifest_id))
                paths.append(path)
                images.append(item.image)
            bar.update(len(chunk))
    if cfg.grid:
        # One image per prompt: tile the prompts into a square instead of one tall column.
        columns = cfg.num_images if cfg.num_images > 1 else math.ceil(math.sqrt(len(images)))
        make_grid(images, columns).save(cfg.out / "grid.png")
    return paths


def main(args: list[str] | None = None) -> None:
    try:
        cfg = parse_config(GenerateConfig, args=args)
        paths = run(cfg)
    except (ConfigError, PipelineFolderError, OSError, ValueError) as e:
        # Problems with the request, the model folder or the output folder: a sentence, not a traceback.
        print(f"ldm-generate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {len(paths)} image(s) to {cfg.out}")


if __name__ == "__main__":
    main()
