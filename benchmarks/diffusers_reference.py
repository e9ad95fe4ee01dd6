"""One training step the way diffusers' examples/text_to_image/train_text_to_image.py takes it, for
`benchmarks/train_throughput.py` to time beside ours on the very same models and images.

Written from the example's order of operations (diffusers 0.42), not copied from it, and nothing is
downloaded: its models are the ones the benchmark builds (the same UNet2DConditionModel, AutoencoderKL
and CLIPTextModel objects, with the UNet's weights copied so both start equal), its data the same PNGs.

    data:      a map-style dataset, PIL decode -> Resize(64, bilinear) -> CenterCrop(64) ->
               RandomHorizontalFlip -> ToTensor -> Normalize(0.5, 0.5); captions tokenised in the
               dataset transform (padding="max_length", max_length=77, truncation=True), default
               collate, DataLoader(shuffle=True, num_workers as given; the example's default is 0)
    encoders:  vae.encode(pixels).latent_dist.sample() * scaling_factor and text_encoder(input_ids)[0]
               with requires_grad off but outside no_grad (as the example runs them), fp32
    step:      noise, timesteps ~ U{0..999}, DDPMScheduler.add_noise, UNet, min-SNR(gamma 5) weighted
               MSE to the noise, backward, clip_grad_norm_(1.0), AdamW step, LR scheduler step,
               zero_grad, EMAModel.step (foreach=False, the example's default)

The example has no caption dropout; ours drops 10%, a cost of the same order as its absence.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from transformers import CLIPTextModel, PreTrainedTokenizerBase


class CaptionedPNGs(torch.utils.data.Dataset):
    """imgNNNN.png + imgNNNN.txt pairs, transformed as the example's preprocess_train does."""

    def __init__(self, folder: Path, tokenizer: PreTrainedTokenizerBase, resolution: int) -> None:
        from torchvision import transforms

        self.images = sorted(folder.glob("*.png"))
        self.tokenizer = tokenizer
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pixels = self.transform(Image.open(self.images[i]).convert("RGB"))  # [3, H, W] in [-1, 1]
        caption = self.images[i].with_suffix(".txt").read_text(encoding="utf-8")
        ids = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]  # [77]
        return {"pixel_values": pixels, "input_ids": ids}


class DiffusersStyleStep:
    """The example's training step on `unet` (a copy is trained), `vae` and `text_encoder`."""

    def __init__(self, folder: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: PreTrainedTokenizerBase, resolution: int, batch_size: int, workers: int,
                 mixed_precision: str = "no") -> None:
        torch.manual_seed(0)
        self.unet = copy.deepcopy(unet).train()
        # --mixed_precision bf16: the example casts the frozen encoders to weight_dtype and accelerate
        # autocasts the UNet's forward (its weights and optimizer stay fp32).
        self.weight_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
        if self.weight_dtype != torch.float32:
            vae, text_encoder = copy.deepcopy(vae).to(self.weight_dtype), copy.deepcopy(text_encoder).to(self.weight_dtype)
        self.vae, self.text_encoder = vae, text_encoder
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.ema = EMAModel(self.unet.parameters(), model_cls=UNet2DConditionModel, model_config=self.unet.config)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012)
        dataset = CaptionedPNGs(folder, tokenizer, resolution)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                                  drop_last=True)
        self._it = iter(self.loader)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._it)
        except StopIteration:  # the example loops over epochs
            self._it = iter(self.loader)
            return next(self._it)

    def step(self, phase: Callable[[str], AbstractContextManager]) -> None:
        with phase("data/collate"):
            batch = self._next_batch()
        with phase("VAE encode"):
            latents = self.vae.encode(batch["pixel_values"].to(self.weight_dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor  # [B, 4, 16, 16]
        with phase("text encode"):
            hidden = self.text_encoder(batch["input_ids"])[0]  # [B, 77, 384]
        with phase("UNet fwd+bwd"):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device).long()
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.weight_dtype == torch.bfloat16):
                pred = self.unet(noisy, timesteps, hidden).sample
            snr = compute_snr(self.scheduler, timesteps)
            weights = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
            loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
            loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
            loss.backward()
        with phase("optimizer+EMA"):
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self.ema.step(self.unet.parameters())
