"""The latent contract of an autoencoder imported from elsewhere: the contract plus where it came from.

``launch/import_vae.py`` writes the same stage-1 folder as ``train_vae.py`` (statistics measured on the
user's data and folded into the weights), so everything downstream reads it unchanged. What it adds is
``source``: the spec, the sha256 of the source weights, and the source's own latent normalisation
(``scaling_factor``/``shift_factor``/``latents_mean``/``latents_std``), so a later stage can tell whether a
UNet trained on the source's latents sees the latents it was trained on (``normalization``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autoencoder.latents import LatentContract

# How the folded statistics were chosen.
NORMALIZATIONS = ("measured", "source")


@dataclass(frozen=True)
class ImportedLatentContract(LatentContract):
    """``LatentContract`` + ``source`` (a JSON-ready provenance record, see ``autoencoder.pretrained``)."""

    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.source.get("spec"):
            raise ValueError("ImportedLatentContract: source must name the spec the weights came from")
        if self.source.get("normalization") not in NORMALIZATIONS:
            raise ValueError(
                f"ImportedLatentContract: source.normalization must be one of {NORMALIZATIONS}, "
                f"got {self.source.get('normalization')!r}"
            )


def contract_from_json_dict(data: dict[str, Any]) -> LatentContract:
    """A stage-1 contract of either kind: trained here, or imported (it has ``source``)."""
    cls = ImportedLatentContract if "source" in data else LatentContract
    return cls.from_json_dict(data)
