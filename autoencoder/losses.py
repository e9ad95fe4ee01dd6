"""Stage-1 training objective: NLL reconstruction (+ LPIPS), KL, and a hinge PatchGAN.

The generator objective follows LDM's ``LPIPSWithDiscriminator`` (Rombach et al. 2022, App. G) and
taming-transformers (Esser et al. 2021, eq. 7), written for a loop with two optimizers:

    rec_i   = |x - x_hat|  (or squared)  + w_p * LPIPS(x, x_hat)         per pixel  [B, C, H, W]
    nll     = mean_b sum_i ( rec_i / exp(logvar) + logvar )              learnable scalar logvar
    kl      = mean_b sum_j KL(q(z_j | x) || N(0, 1))                      over latent elements
    L_G     = nll + w_kl * kl + lambda * w_d * (-mean D(x_hat))           GAN only after start step
    lambda  = clamp(||grad_L nll|| / (||grad_L adv|| + 1e-4), 0, max).detach()   L = decoder's last layer
    L_D     = 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat.detach())))     hinge (Lim & Ye 2017)

Per-image sums (not means) keep ``kl_weight=1e-6`` meaning what it means in LDM's configs. The
learnable ``logvar`` lives in ``TrainableAutoencoder`` (so it is in the generator optimizer and
synced by DDP); this module has no trainable parameters and is never wrapped by DDP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.discriminator import DiscriminatorConfig
from autoencoder.perceptual import PerceptualLoss, build_perceptual_loss


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """The autoencoder's training loss: reconstruction, KL, optional LPIPS and hinge GAN (LDM's recipe)."""

    reconstruction: Literal["l1", "l2"] = "l1"
    """Pixel reconstruction error: l1, or l2 (what PSNR measures)."""
    kl_weight: float = 1e-6
    """Weight of the KL term towards N(0, 1) on the posterior."""
    perceptual_weight: float = 0.0
    """Weight of LPIPS; needs the ImageNet trunk weights on disk (autoencoder/perceptual.py). 0: off."""
    perceptual_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    """LPIPS trunk network."""
    perceptual_backbone_file: str | None = None
    """Trunk weights file for LPIPS; default: torchvision's cache under $TORCH_HOME."""
    logvar_init: float = 0.0
    """Initial learned output log-variance of the reconstruction likelihood."""
    discriminator_weight: float = 0.5
    """Weight of the generator's GAN loss (times the adaptive weight)."""
    discriminator_start_step: int | None = None
    """Step at which the GAN switches on; None: never."""
    adaptive_weight_max: float = 1e4
    """Cap of the adaptive GAN weight (ratio of reconstruction to GAN gradient norms at the last layer)."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """Shape of the PatchGAN discriminator."""

    def __post_init__(self) -> None:
        if isinstance(self.discriminator, dict):  # from JSON
            object.__setattr__(self, "discriminator", DiscriminatorConfig(**self.discriminator))
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"AutoencoderLossConfig.reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}")
        for name in ("kl_weight", "perceptual_weight", "discriminator_weight", "adaptive_weight_max", "logvar_init"):
            value = getattr(self, name)
            if not math.isfinite(value) or (name != "logvar_init" and value < 0):
                raise ValueError(f"AutoencoderLossConfig.{name} must be a finite number"
                                 f"{'' if name == 'logvar_init' else ' >= 0'}, got {value}")
        if self.discriminator_start_step is not None and self.discriminator_start_step < 0:
            raise ValueError("AutoencoderLossConfig.discriminator_start_step must be >= 0 or None (never)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


AUTOENCODER_LOSS_PRESETS: dict[str, AutoencoderLossConfig] = {
    "tiny": AutoencoderLossConfig(discriminator=DiscriminatorConfig(channels=8, n_layers=2, norm_num_groups=4)),
    # CPU demo: L2 + KL only. L2 is what PSNR measures; LPIPS needs downloaded weights and a GAN
    # needs far longer than the demo's minutes.
    "small": AutoencoderLossConfig(reconstruction="l2", discriminator=DiscriminatorConfig(channels=32, n_layers=2)),
    # LDM's kl-f8 / kl-f4 recipe: LPIPS 1.0, KL 1e-6, hinge GAN 0.5 from step 50001.
    "kl-f8": AutoencoderLossConfig(perceptual_weight=1.0, discriminator_start_step=50001),
    "kl-f4": AutoencoderLossConfig(perceptual_weight=1.0, discriminator_start_step=50001),
}


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off for the module's parameters, restoring each flag afterwards.

    Autograd records at forward time which leaves need gradients, so a graph built inside this
    block never produces gradients for these parameters, whenever its backward runs.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_adversarial_weight(
    nll: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """Esser et al. 2021 eq. 7: scale the GAN term so its gradient at the last layer matches the NLL's."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (adv_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """The stage-1 losses. Holds only frozen parts (LPIPS), so it needs ``.to(device)``, not DDP."""

    def __init__(self, cfg: AutoencoderLossConfig, perceptual: PerceptualLoss | None = None) -> None:
        super().__init__()
        self.config = cfg
        if perceptual is not None and cfg.perceptual_weight == 0:
            raise ValueError("a perceptual loss module was given but perceptual_weight is 0; set a weight or pass None")
        if perceptual is None and cfg.perceptual_weight > 0:
            perceptual = build_perceptual_loss(cfg.perceptual_net, "imagenet", cfg.perceptual_backbone_file)
        self.perceptual = perceptual

    def discriminator_active(self, global_step: int) -> bool:
        start = self.config.discriminator_start_step
        return start is not None and global_step >= start

    def reconstruction_error(self, inputs: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Per-pixel error [B, C, H, W]."""
        diff = inputs - reconstruction
        return diff.abs() if self.config.reconstruction == "l1" else diff.square()

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstruction: torch.Tensor,
        posterior,
        output_logvar: torch.Tensor,
        global_step: int,
        last_layer_weight: torch.Tensor | None = None,
        discriminator: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss and detached 0-dim logs (same keys at every step).

        inputs, reconstruction: [B, C, H, W] in [-1, 1]; posterior: the encoder's
        ``DiagonalGaussianDistribution``; output_logvar: [] from ``TrainableAutoencoder``.
        Once the GAN is on, ``discriminator`` and ``last_layer_weight`` (``model.last_layer()``) are
        required. Under ``torch.no_grad()`` (validation) the adaptive weight cannot be measured and is 0.
        """
        cfg = self.config
        error = self.reconstruction_error(inputs, reconstruction)
        perceptual = torch.zeros(inputs.shape[0], device=inputs.device)
        rec = error
        if self.perceptual is not None:
            perceptual = self.perceptual(inputs, reconstruction)  # [B]
            rec = error + cfg.perceptual_weight * perceptual[:, None, None, None]
        nll = (rec / output_logvar.exp() + output_logvar).sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()
        loss = nll + cfg.kl_weight * kl
        adversarial, weight = self._adversarial_term(reconstruction, nll, global_step, last_layer_weight, discriminator)
        loss = loss + cfg.discriminator_weight * weight * adversarial
        logs = {
            "loss": loss, "nll": nll, "reconstruction": error.mean(), "perceptual": perceptual.mean(),
            "kl": kl, "output_logvar": output_logvar, "adversarial": adversarial, "adaptive_weight": weight,
        }
        return loss, {k: v.detach().float().reshape(()) for k, v in logs.items()}

    def _adversarial_term(
        self,
        reconstruction: torch.Tensor,
        nll: torch.Tensor,
        global_step: int,
        last_layer_weight: torch.Tensor | None,
        discriminator: nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(-mean D(x_hat), adaptive weight); zeros before the GAN switches on."""
        zero = torch.zeros((), device=reconstruction.device)
        if not self.discriminator_active(global_step):
            return zero, zero
        if discriminator is None or last_layer_weight is None:
            raise ValueError(
                f"the GAN is on at step {global_step} (discriminator_start_step="
                f"{self.config.discriminator_start_step}): pass discriminator= and last_layer_weight=model.last_layer()"
            )
        with frozen(discriminator):
            adversarial = -discriminator(reconstruction).mean()
        if not torch.is_grad_enabled():
            return adversarial, zero
        weight = adaptive_adversarial_weight(nll, adversarial, last_layer_weight, self.config.adaptive_weight_max)
        return adversarial, weight

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstruction: torch.Tensor, global_step: int, discriminator: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss for the discriminator; the reconstruction is detached here (no grad reaches the VAE)."""
        if not self.discriminator_active(global_step):
            raise ValueError(
                f"discriminator_loss called at step {global_step}, before discriminator_start_step="
                f"{self.config.discriminator_start_step}; check discriminator_active(step) first"
            )
        # One forward for real and fake: one DDP forward per backward, and GroupNorm is per sample.
        logits = discriminator(torch.cat([inputs.detach(), reconstruction.detach()]))
        logits_real, logits_fake = logits.chunk(2)
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        logs = {"discriminator_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach().float() for k, v in logs.items()}
