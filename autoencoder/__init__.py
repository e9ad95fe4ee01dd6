"""Stage 1: the KL autoencoder, its losses, discriminator, metrics and the latent contract."""

from autoencoder.model import (
    AUTOENCODER_PRESETS,
    AutoencoderConfig,
    AutoencoderOutput,
    TrainableAutoencoder,
    build_autoencoder,
    decoder_last_layer,
)

__all__ = [
    "AUTOENCODER_PRESETS",
    "AutoencoderConfig",
    "AutoencoderOutput",
    "TrainableAutoencoder",
    "build_autoencoder",
    "decoder_last_layer",
]
