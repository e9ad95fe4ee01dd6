"""Stage 1: the KL autoencoder, its losses, discriminator, metrics and the latent contract."""

from autoencoder.discriminator import DiscriminatorConfig, PatchDiscriminator, build_discriminator
from autoencoder.folder import load_autoencoder, save_autoencoder
from autoencoder.latents import LatentContract, LatentStatistics, fold_latent_statistics
from autoencoder.losses import AUTOENCODER_LOSS_PRESETS, AutoencoderLoss, AutoencoderLossConfig
from autoencoder.metrics import psnr, reconstruction_metrics, ssim
from autoencoder.model import (
    AUTOENCODER_PRESETS,
    AutoencoderConfig,
    AutoencoderOutput,
    TrainableAutoencoder,
    build_autoencoder,
    decoder_last_layer,
)

__all__ = [
    "AUTOENCODER_LOSS_PRESETS",
    "AUTOENCODER_PRESETS",
    "AutoencoderConfig",
    "AutoencoderLoss",
    "AutoencoderLossConfig",
    "AutoencoderOutput",
    "DiscriminatorConfig",
    "LatentContract",
    "LatentStatistics",
    "PatchDiscriminator",
    "TrainableAutoencoder",
    "build_autoencoder",
    "build_discriminator",
    "decoder_last_layer",
    "fold_latent_statistics",
    "load_autoencoder",
    "psnr",
    "reconstruction_metrics",
    "save_autoencoder",
    "ssim",
]
