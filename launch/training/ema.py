"""Exponential moving average of the trained weights, the one place that builds an EMA copy, and
post-hoc EMA (EDM2): power-function averages stored as snapshots, any EMA length rebuilt from them."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from foundation import write_bytes_atomic


class EMA(torch.nn.Module):
    """Exponential moving average of a model's parameters, with warmup.

    decay_t = min(decay, (1 + t) / (10 + t)): early averages are not dominated by the random
    initialisation (a power-function average of relative length ~0.09 until the cap). With
    ``sigma_rel`` the warmup is EDM2's power function of that relative length instead,
    decay_t = min(decay, (1 - 1/t)^(gamma + 1)): the average always spans the same fraction of the
    run however long it turns out to be (a time-capped run does not know its length). It is a Module
    so its shadow weights checkpoint as safetensors like any other.
    """

    def __init__(self, model: torch.nn.Module, decay: float, sigma_rel: float = 0.0):
        super().__init__()
        self.decay = decay
        self.gamma = gamma_of(sigma_rel) if sigma_rel > 0 else None
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for i, n in enumerate(self.names):
            self.register_buffer(f"p{i}", params[n].detach().float().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._t: int | None = None  # host copy of num_updates, so update() never syncs a GPU

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._t = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _shadow(self) -> list[torch.Tensor]:
        return [getattr(self, f"p{i}") for i in range(len(self.names))]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self._t is None:
            self._t = int(self.num_updates)
        self._t += 1
        self.num_updates.fill_(self._t)
        t = self._t
        warmup = (1 + t) / (10 + t) if self.gamma is None else (1 - 1 / t) ** (self.gamma + 1)
        decay = min(self.decay, warmup)
        params = dict(model.named_parameters())
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(self._shadow(), current, 1.0 - decay)

    def weights(self) -> dict[str, torch.Tensor]:
        """{parameter name: averaged value} (float32)."""
        return dict(zip(self.names, self._shadow()))

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, shadow in zip(self.names, self._shadow()):
            params[n].copy_(shadow.to(params[n].dtype))


@torch.no_grad()
def averaged_copy(model: torch.nn.Module, ema: EMA | None, into: torch.nn.Module | None = None) -> torch.nn.Module:
    """An eval-mode copy of ``model`` holding the EMA weights (``model``'s own when ``ema`` is None).

    Pass the previous result as ``into`` to refill it in place instead of allocating another copy
    (validation does this every few hundred steps). ``model`` itself is never changed.
    """
    if into is None:
        into = copy.deepcopy(model).eval()
    else:
        into.load_state_dict(model.state_dict())
    if ema is not None:
        ema.copy_to(into)
    return into


# -- post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
# Models", section 3 and appendix C) ----------------------------------------------------------------
#
# A power-function EMA averages the weights theta(tau) seen up to time t with the profile
#     p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t           (eq. 2)
# Its width relative to t is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), so one
# number describes the average at any length of training. In steps it is the update
#     theta_hat <- beta_t theta_hat + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),
# which gives step tau exactly the weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the
# profile integrated over the step. Storing snapshots of two such averages every N steps lets any
# other profile be rebuilt afterwards as the least-squares combination of the stored ones.

GAMMA_MIN = 0.0  # sigma_rel = sqrt(1/12) ~ 0.289 at gamma = 0; wider profiles weight early steps most


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power profile with exponent ``gamma``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent whose profile has this ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (sigma_rel_of solved for gamma)."""
    limit = sigma_rel_of(GAMMA_MIN)
    if not 0 < sigma_rel < limit:
        raise ValueError(f"sigma_rel must be in (0, {limit:.4f}), got {sigma_rel}: it is the EMA length as a "
                         "fraction of training time (EDM2 tracks 0.05 and 0.10)")
    inv = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


@dataclass
class PostHocEMAConfig:
    """Power-function EMA snapshots for post-hoc EMA (EDM2): choose the EMA length after training."""

    snapshot_every: int = 0
    """Write a snapshot of every tracked average every this many steps (and at the last step); 0: off.
    Rebuild any EMA length from them with launch/posthoc_ema.py."""
    sigma_rels: tuple[float, ...] = (0.05, 0.10)
    """Relative widths of the tracked power-function profiles (EDM2 tracks 0.05 and 0.10)."""

    def __post_init__(self) -> None:
        if self.snapshot_every < 0:
            raise ValueError(f"posthoc_ema.snapshot_every must be >= 0, got {self.snapshot_every}")
        if self.snapshot_every and not self.sigma_rels:
            raise ValueError("posthoc_ema.sigma_rels is empty: name at least one profile to track (e.g. 0.05 0.10)")
        for s in self.sigma_rels:
            gamma_of(s)  # raises on an impossible width


class PowerEMA(torch.nn.Module):
    """Power-function EMAs of a model's trainable parameters, one per ``sigma_rels`` entry.

    A Module, so the averages are checkpointed (and restored on resume) like any other weights.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: tuple[float, ...]):
        super().__init__()
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for k in range(len(self.sigma_rels)):
            for i, n in enumerate(self.names):
                self.register_buffer(f"e{k}_p{i}", params[n].detach().float().clone())
        self.register_buffer("tracked_sigma_rels", torch.tensor(self.sigma_rels, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._t: int | None = None  # host copy of num_updates, so update() never syncs a GPU

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        saved = state_dict.get("tracked_sigma_rels")
        if saved is not None and tuple(saved.tolist()) != self.sigma_rels:
            raise ValueError(f"the checkpoint tracks post-hoc EMA sigma_rels {tuple(saved.tolist())}, this run asks "
                             f"for {self.sigma_rels}: resume with the same --posthoc-ema.sigma-rels")
        self._t = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _shadow(self, k: int) -> list[torch.Tensor]:
        return [getattr(self, f"e{k}_p{i}") for i in range(len(self.names))]

    @property
    def updates(self) -> int:
        return int(self.num_updates) if self._t is None else self._t

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self._t = self.updates + 1
        self.num_updates.fill_(self._t)
        params = dict(model.named_parameters())
        current = [params[n].detach().float() for n in self.names]
        for k, gamma in enumerate(self.gammas):
            beta = (1.0 - 1.0 / self._t) ** (gamma + 1.0)  # 0 at the first update: the start is forgotten
            torch._foreach_lerp_(self._shadow(k), current, 1.0 - beta)

    def weights(self, k: int) -> dict[str, torch.Tensor]:
        """{parameter name: average of profile ``k``} (float32)."""
        return dict(zip(self.names, self._shadow(k)))

    def save_snapshot(self, folder: Path, step: int) -> Path:
        """``folder/snapshot_STEP.safetensors`` with every profile's average, written atomically."""
        tensors = {f"{k}/{n}": w.detach().cpu().contiguous() for k in range(len(self.sigma_rels))
                   for n, w in self.weights(k).items()}
        # One metadata key: safetensors writes several in hash order, and a resumed run must write the same bytes.
        info = {"format": SNAPSHOT_FORMAT, "step": step, "updates": self.updates, "sigma_rels": list(self.sigma_rels)}
        path = Path(folder) / f"snapshot_{step:08d}.safetensors"
        write_bytes_atomic(path, safetensors.torch.save(tensors, metadata={SNAPSHOT_KEY: json.dumps(info, sort_keys=True)}))
        return path


SNAPSHOT_FORMAT = "ldm-phema/1"
SNAPSHOT_KEY = "posthoc_ema"


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot: the averages of every tracked profile after ``updates`` EMA updates."""

    path: Path
    step: int
    updates: int
    sigma_rels: tuple[float, ...]


def list_snapshots(folder: Path) -> list[Snapshot]:
    """The snapshots in ``folder`` in step order (their headers only; no weights are read)."""
    out = []
    for path in sorted(Path(folder).glob("snapshot_*.safetensors")):
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(SNAPSHOT_KEY, "{}"))
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a post-hoc EMA snapshot (format {meta.get('format')!r}, "
                             f"expected {SNAPSHOT_FORMAT!r})")
        out.append(Snapshot(path, int(meta["step"]), int(meta["updates"]), tuple(meta["sigma_rels"])))
    return sorted(out, key=lambda s: s.step)


def profile_inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_{g_a,t_a}, p_{g_b,t_b}> = integral over tau of their product, broadcast elementwise.

    Both profiles are non-zero on [0, min(t_a, t_b)]; with m = min(t_a, t_b) the integral is
    (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)), computed as ratios
    (m/t_a)^(g_a+1) (m/t_b)^(g_b+1) / m so that large t and gamma stay in range.
    """
    m = np.minimum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (m / t_a) ** (g_a + 1) * (m / t_b) ** (g_b + 1) / m


def posthoc_coefficients(times: list[int], gammas: list[float], target_time: int, target_gamma: float
                         ) -> tuple[np.ndarray, float]:
    """(x, fit error): the combination sum_i x_i p_i closest (L2) to the target profile.

    Solves the normal equations A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_target> (EDM2 appendix C.3),
    then rescales x to sum to 1 so the rebuilt weights are an average. The fit error is
    ||sum_i x_i p_i - p_target|| / ||p_target||: near 0 means the rebuilt average is the asked-for one.
    """
    t = np.asarray(times, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    a = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_products(t, g, np.float64(target_time), np.float64(target_gamma))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / x.sum()
    c = profile_inner_products(np.float64(target_time), np.float64(target_gamma),
                               np.float64(target_time), np.float64(target_gamma))
    err2 = max(float(x @ a @ x - 2 * x @ b + c), 0.0)
    return x, math.sqrt(err2 / c)


@dataclass(frozen=True)
class Reconstruction:
    """An EMA of length ``sigma_rel`` rebuilt from snapshots, and how well the profile was matched."""

    weights: dict[str, torch.Tensor]
    sigma_rel: float
    step: int
    updates: int
    snapshots: int
    fit_error: float


def reconstruct(folder: Path, sigma_rel: float, step: int = 0) -> Reconstruction:
    """The power-function EMA of width ``sigma_rel`` at snapshot ``step`` (0: the newest), from every
    profile of every snapshot up to it. Reads one snapshot at a time."""
    snaps = list_snapshots(folder)
    if not snaps:
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {folder}: train with --posthoc-ema.snapshot-every N")
    by_step = {s.step: s for s in snaps}
    if step and step not in by_step:
        raise ValueError(f"no snapshot at step {step} in {folder}; snapshots exist at steps {sorted(by_step)}")
    target = by_step[step] if step else snaps[-1]
    used = [s for s in snaps if s.step <= target.step and s.updates > 0]
    times = [s.updates for s in used for _ in s.sigma_rels]
    gammas = [gamma_of(r) for s in used for r in s.sigma_rels]
    x, err = posthoc_coefficients(times, gammas, target.updates, gamma_of(sigma_rel))
    weights: dict[str, torch.Tensor] = {}
    i = 0
    for s in used:
        tensors = safetensors.torch.load_file(str(s.path))
        for k in range(len(s.sigma_rels)):
            prefix = f"{k}/"
            for key, value in tensors.items():
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    term = value.double() * float(x[i])
                    weights[name] = term if name not in weights else weights[name].add_(term)
            i += 1
    weights = {n: w.float() for n, w in weights.items()}
    return Reconstruction(weights, sigma_rel, target.step, target.updates, len(used), err)
