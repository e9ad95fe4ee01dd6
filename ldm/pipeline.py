"""The composed text-to-image pipeline: text encoder -> UNet + sampler + CFG -> VAE decoder.

On disk it is a diffusers ``StableDiffusionPipeline`` folder (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) plus ``ldm_manifest.json``, so stock
diffusers loads it and, with the same scheduler and generators, produces the same images.

Sampling follows ``StableDiffusionPipeline.__call__`` step for step (see ``generate``); what we add
is per-image seeds (image k of a call uses ``torch.Generator("cpu").manual_seed(seed + k)``, so an
image does not depend on the batch it was made in and can be regenerated alone), the null
embedding the model was trained with for the unconditional branch, and checks that refuse a
folder whose stages do not fit together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from text_encoder import FrozenTextEncoder

from ldm.cli import from_dict
from ldm.guidance import classifier_free_guidance
from ldm.manifest import PipelineMismatchError, check_folder_complete, read_manifest, verify_files
from ldm.objective import NoiseScheduleConfig
from ldm.pipeline_io import load_text_encoder_from, load_vae, write_pipeline
from ldm.samplers import DEFAULT_SAMPLER, build_sampler, denoise_latents
from ldm.unet import UNetConfig, unet_denoiser

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


@dataclass
class GeneratedImage:
    image: Image.Image
    prompt: str
    negative_prompt: str | None
    seed: int | None  # None when the caller passed its own generator(s)


class LatentDiffusionPipeline:
    """UNet + autoencoder + frozen text encoder + noise schedule, ready to sample and to save."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: FrozenTextEncoder,
        schedule: NoiseScheduleConfig,
        vae_dir: str | Path,
        default_sampler: str = DEFAULT_SAMPLER,
        unet_config: UNetConfig | None = None,
        training_config: Mapping[str, Any] | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        build_sampler(default_sampler, schedule)  # refuse an unknown or unsupported default early
        self.unet, self.vae, self.text_encoder, self.schedule = unet, vae, text_encoder, schedule
        self.vae_dir = Path(vae_dir)
        self.default_sampler = default_sampler
        self.unet_config = unet_config
        self.training_config = dict(training_config or {})
        self.manifest = manifest  # None until saved or when built from parts
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.factor)
        _check_stages_fit(unet, vae, text_encoder)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_parts(
        cls,
        unet: UNet2DConditionModel,
        vae_dir: str | Path,
        text_encoder: FrozenTextEncoder,
        schedule: NoiseScheduleConfig,
        **kwargs: Any,
    ) -> LatentDiffusionPipeline:
        """Compose a pipeline in memory (e.g. in the training script) from a trained autoencoder folder."""
        vae, _ = load_vae(Path(vae_dir), device=unet.device, dtype=unet.dtype)
        return cls(unet, vae, text_encoder, schedule, vae_dir=vae_dir, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        verify: bool = True,
    ) -> LatentDiffusionPipeline:
        """Load a folder written by ``save_pretrained``; ``verify`` re-hashes every file first."""
        folder = Path(folder)
        check_folder_complete(folder)
        manifest = read_manifest(folder)
        verify_files(folder, manifest, check_hashes=verify)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, torch_dtype=dtype)
        vae, _ = load_vae(folder / "vae", device=device, dtype=dtype)
        text_encoder = load_text_encoder_from(folder, manifest, device=device, dtype=dtype)
        info = manifest["unet"].get("config")
        return cls(
            unet.to(device).eval(),
            vae,
            text_encoder,
            from_dict(NoiseScheduleConfig, manifest["schedule"], "ldm_manifest.json schedule"),
            vae_dir=folder / "vae",
            default_sampler=manifest["default_sampler"],
            unet_config=from_dict(UNetConfig, info, "ldm_manifest.json unet") if info else None,
            training_config=manifest.get("training", {}),
            manifest=manifest,
        )

    def save_pretrained(self, out_dir: str | Path, overwrite: bool = False) -> str:
        """Write the diffusers-layout folder + manifest atomically; returns the manifest id."""
        manifest = write_pipeline(
            Path(out_dir),
            unet=self.unet,
            vae_dir=self.vae_dir,
            text_encoder=self.text_encoder,
            schedule=self.schedule,
            default_sampler=self.default_sampler,
            unet_config=self.unet_config,
            training_config=self.training_config,
            overwrite=overwrite,
        )
        self.manifest = manifest  # the folder now holds exactly this pipeline: images can cite its id
        return manifest["manifest_id"]

    # -- properties -----------------------------------------------------------------------------

    @property
    def factor(self) -> int:
        """Pixels per latent along each side; diffusers' own ``vae_scale_factor`` formula."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def manifest_id(self) -> str | None:
        return None if self.manifest is None else self.manifest["manifest_id"]

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # -- sampling -------------------------------------------------------------------------------

    def __call__(self, prompts: str | Sequence[str], *args: Any, **kwargs: Any) -> list[Image.Image]:
        """Text to images: ``generate`` (same arguments) without the per-image metadata."""
        return [item.image for item in self.generate(prompts, *args, **kwargs)]

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        steps: int = DEFAULT_STEPS,
        sampler: str | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        guidance_rescale: float = 0.0,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress: bool = False,
    ) -> list[GeneratedImage]:
        """Images in prompt order, ``num_images_per_prompt`` consecutive images per prompt.

        guidance_scale 1 runs the conditional model alone (as diffusers does); any other value runs
        classifier-free guidance (diffusers skips guidance for every scale <= 1; we do not, so 0 is
        unconditional sampling). Without ``generator``, image k uses seed ``seed + k``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negatives = _negative_prompts(negative_prompt, len(prompts))
        height, width = self._check_request(prompts, num_images_per_prompt, steps, batch_size, height, width)
        sampler = sampler or self.default_sampler
        build_sampler(sampler, self.schedule)  # unknown name: fail before any work
        per_image = [(p, n) for p, n in zip(prompts, negatives) for _ in range(num_images_per_prompt)]
        generators, seeds = _generators(len(per_image), seed, generator)
        out: list[GeneratedImage] = []
        for start in range(0, len(per_image), batch_size):
            chunk = per_image[start : start + batch_size]
            gen = generators[start : start + batch_size] if isinstance(generators, list) else generators
            latents = self.sample_latents(
                chunk, gen, steps, sampler, guidance_scale, guidance_rescale, height, width, progress
            )
            images = self.decode_latents(latents)
            out += [GeneratedImage(im, p, n, s) for im, (p, n), s in zip(images, chunk, seeds[start:])]
        return out

    @torch.no_grad()
    def sample_latents(
        self,
        chunk: list[tuple[str, str | None]],
        generator: torch.Generator | list[torch.Generator] | None,
        steps: int,
        sampler: str,
        scale: float,
        rescale: float,
        height: int,
        width: int,
        progress: bool = False,
    ) -> torch.Tensor:
        """Latents [b, C, H/f, W/f] for one batch of (prompt, negative prompt or None) pairs, in
        StableDiffusionPipeline's order of operations. ``generate`` = this + ``decode_latents``."""
        hidden = self._encode([p for p, _ in chunk])  # [b, L, D]
        shape = (len(chunk), self.unet.config.in_channels, height // self.factor, width // self.factor)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=hidden.dtype)
        denoiser = unet_denoiser(self.unet)
        if scale != 1.0:
            uncond = self._encode_uncond([n for _, n in chunk])
            denoiser = classifier_free_guidance(denoiser, uncond, scale, rescale)
        scheduler = build_sampler(sampler, self.schedule)  # fresh: schedulers keep per-run state
        return denoise_latents(scheduler, denoiser, noise, hidden, steps, generator, progress)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        hidden = self.text_encoder.encode(prompts).hidden
        return hidden.to(device=self.device, dtype=self.unet.dtype)

    def _encode_uncond(self, negatives: list[str | None]) -> torch.Tensor:
        """Negative prompts where given, else the null embedding the model was trained with."""
        null = self.text_encoder.null_embedding().hidden.to(device=self.device, dtype=self.unet.dtype)
        given = [n for n in negatives if n is not None]
        if not given:
            return null.expand(len(negatives), -1, -1)
        encoded = iter(self._encode(given))  # one batched call, as diffusers encodes negatives
        return torch.stack([null[0] if n is None else next(encoded) for n in negatives])

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        # Latents are already normalised by the autoencoder (scaling_factor 1.0 by contract);
        # dividing keeps stock diffusers' formula for any other value.
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")

    def _check_request(self, prompts, num_images, steps, batch_size, height, width) -> tuple[int, int]:
        if not prompts:
            raise ValueError("no prompts given")
        for name, value in (("num_images_per_prompt", num_images), ("steps", steps), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        height = height or self.unet.config.sample_size * self.factor
        width = width or self.unet.config.sample_size * self.factor
        if height % self.factor or width % self.factor or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of the autoencoder's downsampling factor "
                f"{self.factor}; got {height}x{width}"
            )
        return height, width


def _negative_prompts(negative: str | Sequence[str] | None, n: int) -> list[str | None]:
    if negative is None or isinstance(negative, str):
        return [negative] * n
    negative = list(negative)
    if len(negative) != n:
        raise ValueError(f"{len(negative)} negative prompts for {n} prompts; give one, or one per prompt")
    return negative


def _generators(
    n: int, seed: int, generator: torch.Generator | list[torch.Generator] | None
) -> tuple[torch.Generator | list[torch.Generator], list[int | None]]:
    """One CPU generator per image seeded ``seed + k`` (diffusers accepts a list per sample)."""
    if generator is None:
        return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)], [seed + k for k in range(n)]
    if isinstance(generator, list) and len(generator) != n:
        raise ValueError(f"{len(generator)} generators for {n} images; pass one per image or a single one")
    return generator, [None] * n


def _check_stages_fit(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: FrozenTextEncoder) -> None:
    width, channels = text_encoder.hidden_size, vae.config.latent_channels
    if unet.config.cross_attention_dim != width:
        raise PipelineMismatchError(
            f"the UNet cross-attends to width {unet.config.cross_attention_dim} but the text encoder "
            f"outputs width {width}: they were not trained together"
        )
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        raise PipelineMismatchError(
            f"the UNet works on {unet.config.in_channels} latent channels but the autoencoder has "
            f"{channels}: they were not trained together"
        )
