"""The latent contract: per-channel latent statistics, folded into the autoencoder's 1x1 convs.

Rombach et al. 2022 (LDM, sec. 4.3.2 / App. D.1) rescale latents to unit variance with one scalar
measured on one batch (SD's 0.18215). We measure per-channel mean ``m`` and std ``s`` over the
training data and fold ``z_norm = (z - m) / s`` into the model itself:

    quant_conv:       mean'   = (mean - m) / s          logvar' = logvar - 2 log s
    post_quant_conv:  first maps z_norm -> z_norm * s + m, then the original 1x1 conv

so ``encode()`` returns normalised posteriors (mean *and* samples: sample' = (sample - m) / s with
the same noise), ``decode(encode(x))`` is unchanged, and stock diffusers pipelines with
``scaling_factor = 1.0`` (no shift) are exact.

Statistics are taken over **posterior samples**, not means: stage 3 trains the diffusion model on
``latent_dist.sample()`` (as LDM's ``get_first_stage_encoding`` and diffusers' training scripts do),
and Var[sample] = Var[mean] + E[posterior variance], so only sample statistics make its inputs
unit-variance.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL

from autoencoder.model import AutoencoderConfig, check_config_matches

CONTRACT_FORMAT = "latent-contract/1"
# Below this a channel carries no information; dividing by its std would blow latents up.
MIN_LATENT_STD = 1e-6


class LatentStatistics:
    """Running per-channel count, sum and sum of squares in float64.

    ``as_tensor()`` is one float64 tensor [3, C] (count, sum, sum of squares) that processes can
    all-reduce with a sum (``accelerator.reduce(stats.as_tensor(), "sum")``) and turn back with
    ``from_tensor``. float64 keeps E[z^2] - E[z]^2 accurate over millions of latents.
    """

    def __init__(self, num_channels: int, device: torch.device | str | None = None) -> None:
        if num_channels < 1:
            raise ValueError(f"LatentStatistics needs num_channels >= 1, got {num_channels}")
        self._state = torch.zeros(3, num_channels, dtype=torch.float64, device=device)

    @property
    def num_channels(self) -> int:
        return self._state.shape[1]

    @property
    def count(self) -> int:
        return int(self._state[0, 0].item())

    def update(self, latents: torch.Tensor) -> None:
        """Add latents [B, C, h, w] (every spatial position counts once per channel)."""
        if latents.ndim != 4 or latents.shape[1] != self.num_channels:
            raise ValueError(f"expected latents [B, {self.num_channels}, h, w], got {tuple(latents.shape)}")
        z = latents.detach().to(self._state.device, torch.float64).transpose(0, 1).flatten(1)  # [C, N]
        self._state[0] += z.shape[1]
        self._state[1] += z.sum(dim=1)
        self._state[2] += z.square().sum(dim=1)

    def update_from_posterior(self, posterior, generator: torch.Generator | None = None) -> None:
        """Add one sample of the encoder's ``DiagonalGaussianDistribution`` (see module docstring)."""
        self.update(posterior.sample(generator=generator))

    def as_tensor(self) -> torch.Tensor:
        return self._state.clone()

    @classmethod
    def from_tensor(cls, state: torch.Tensor) -> LatentStatistics:
        if state.ndim != 2 or state.shape[0] != 3:
            raise ValueError(f"expected a [3, C] statistics tensor, got shape {tuple(state.shape)}")
        stats = cls(state.shape[1], device=state.device)
        stats._state = state.detach().to(torch.float64).clone()
        return stats

    def merge(self, other: LatentStatistics) -> LatentStatistics:
        return LatentStatistics.from_tensor(self._state + other._state.to(self._state.device))

    def mean(self) -> torch.Tensor:
        """[C] float64."""
        if self._state[0, 0] < 2:
            raise ValueError("LatentStatistics: need at least 2 values per channel; encode some images first")
        return self._state[1] / self._state[0]

    def std(self) -> torch.Tensor:
        """[C] float64 population std."""
        mean = self.mean()
        var = (self._state[2] / self._state[0] - mean.square()).clamp_min(0.0)
        return var.sqrt()


@dataclass(frozen=True)
class LatentContract:
    """What stage 3 needs to know about the latents; saved as ``latent_contract.json``."""

    latent_mean: tuple[float, ...]  # measured before folding, per channel
    latent_std: tuple[float, ...]
    folded: bool  # True: the model's encode() already returns (z - mean) / std
    autoencoder_config: AutoencoderConfig
    num_values: int  # latent values per channel the statistics were measured over
    statistics_of: str = "posterior_samples"
    weights_sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256, set on save

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_mean", tuple(float(v) for v in self.latent_mean))
        object.__setattr__(self, "latent_std", tuple(float(v) for v in self.latent_std))
        c = self.autoencoder_config.latent_channels
        if len(self.latent_mean) != c or len(self.latent_std) != c:
            raise ValueError(
                f"LatentContract: {len(self.latent_mean)} means and {len(self.latent_std)} stds for {c} latent channels"
            )
        bad = [s for s in self.latent_std if not math.isfinite(s) or s < MIN_LATENT_STD]
        if bad or not all(math.isfinite(m) for m in self.latent_mean):
            raise ValueError(
                f"LatentContract: latent statistics must be finite with std >= {MIN_LATENT_STD}; got mean "
                f"{self.latent_mean}, std {self.latent_std}. A dead or exploding latent channel means stage 1 "
                "did not train properly."
            )

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder_config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.autoencoder_config.latent_channels

    @classmethod
    def from_statistics(cls, stats: LatentStatistics, cfg: AutoencoderConfig, folded: bool = False) -> LatentContract:
        return cls(
            latent_mean=tuple(stats.mean().tolist()), latent_std=tuple(stats.std().tolist()),
            folded=folded, autoencoder_config=cfg, num_values=stats.count,
        )

    def to_json_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["autoencoder_config"] = self.autoencoder_config.to_dict()
        return {
            "format": CONTRACT_FORMAT, "downsample_factor": self.downsample_factor,
            "latent_channels": self.latent_channels, **data,
        }

    @classmethod
    def from_json_dict(cls, data: dict) -> LatentContract:
        data = dict(data)
        if data.pop("format", None) != CONTRACT_FORMAT:
            raise ValueError(f"not a {CONTRACT_FORMAT} latent contract (format field missing or different)")
        factor, channels = data.pop("downsample_factor"), data.pop("latent_channels")
        data["autoencoder_config"] = AutoencoderConfig.from_dict(data["autoencoder_config"])
        contract = cls(**data)
        if (factor, channels) != (contract.downsample_factor, contract.latent_channels):
            raise ValueError(
                f"latent contract says downsample_factor={factor}, latent_channels={channels} but its "
                f"autoencoder_config gives {contract.downsample_factor}, {contract.latent_channels}"
            )
        return contract


@torch.no_grad()
def fold_latent_statistics(vae: AutoencoderKL, stats: LatentStatistics, cfg: AutoencoderConfig) -> LatentContract:
    """Fold the per-channel normalisation into ``quant_conv``/``post_quant_conv`` (in place).

    Returns the contract (``folded=True``, statistics as measured before folding). Fold once: the
    statistics of an already folded model are ~(0, 1) and folding them again changes nothing useful.
    """
    check_config_matches(vae, cfg)
    contract = LatentContract.from_statistics(stats, cfg, folded=True)
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("folding the latent statistics needs quant_conv and post_quant_conv (use_quant_conv=True)")
    c = cfg.latent_channels
    m = torch.tensor(contract.latent_mean, dtype=torch.float64, device=vae.device)  # [C]
    s = torch.tensor(contract.latent_std, dtype=torch.float64, device=vae.device)  # [C]
    q_w, q_b = vae.quant_conv.weight.double(), vae.quant_conv.bias.double()  # [2C, 2C, 1, 1], [2C]
    q_w[:c] /= s[:, None, None, None]  # rows 0..C-1 produce the posterior mean
    q_b[:c] = (q_b[:c] - m) / s
    q_b[c:] -= 2.0 * s.log()  # rows C..2C-1 produce logvar: Var[z/s] = Var[z]/s^2
    p_w, p_b = vae.post_quant_conv.weight.double(), vae.post_quant_conv.bias.double()  # [C, C, 1, 1], [C]
    # post(z) = W z + b with z = s * z_norm + m  =>  (W diag(s)) z_norm + (W m + b)
    new_p_b = p_b + p_w[:, :, 0, 0] @ m
    new_p_w = p_w * s[None, :, None, None]
    for param, value in ((vae.quant_conv.weight, q_w), (vae.quant_conv.bias, q_b),
                         (vae.post_quant_conv.weight, new_p_w), (vae.post_quant_conv.bias, new_p_b)):
        param.copy_(value.to(param.dtype))
    vae.register_to_config(scaling_factor=1.0, shift_factor=None, latents_mean=None, latents_std=None)
    return contract
