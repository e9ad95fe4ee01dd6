"""`CachedLatentLoader`: the latent cache's counterpart of `data.build_loader`, and latent sampling.

An endless stream where epoch e is a permutation of all N samples seeded by (seed, e), rank r takes
the r-th of `world_size` equal slices of it (N // world_size samples; the remainder sits out that
epoch), and whether a sample shows its flipped latents is drawn per sample index from (seed, e). Its
position is one integer, so `state_dict()` is tiny JSON and a resumed loader yields exactly the
batches it would have.

With per-sample `weights` (`--data.balance-by`, see `balance_weights`) an epoch is instead N draws
with replacement, each sample with probability weight / sum, from the same (seed, e) generator:
still N samples an epoch, still one integer of position, so resume stays exact.

A fresh latent `mean + std * eps` is drawn every step (`sample_latents`), exactly as on-the-fly
training draws `latent_dist.sample()`.

Captions: a sample with several caption variants (a list caption) gets, in epoch e, the variant the
uncached loader would give it: `chosen_variant` draws with `data.sample.sample_draws(seed, e,
identity)`, the sample's own numbers, and picks with `data.captions.variant_position`, the code
`resolve_caption` picks with. The batch's `captions` and `text_hidden` are that variant's.

A bucketed or mixed cache is read by `ldm.cache.planned.CachedPlannedLoader`; `cached_loader` picks.
"""

from __future__ import annotations

from typing import Any

import torch

from data.captions import variant_position
from data.sample import SampleDraws, sample_draws
from foundation import derived_seed
from ldm.cache.reader import LatentCache

STATE_VERSION = 1


def sample_latents(latent_mean: torch.Tensor, latent_std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw z = mean + std * eps, eps ~ N(0, I) from the step's `generator` (on its device).

    latent_mean, latent_std: [B, C, h, w]. The draw is float32 (cached fp16/bf16 values are widened
    first) on the generator's device, like `latent_dist.sample()` on the fly; returns [B, C, h, w].
    """
    if latent_mean.shape != latent_std.shape:
        raise ValueError(f"latent_mean {tuple(latent_mean.shape)} and latent_std {tuple(latent_std.shape)} "
                         "differ in shape")
    device = generator.device
    mean = latent_mean.to(device, torch.float32)
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
    return mean + latent_std.to(device, torch.float32) * eps


def chosen_variant(cache: LatentCache, row: int, seed: int, epoch: int, draws: SampleDraws | None = None) -> int:
    """Which caption variant of cache row `row` training uses in `epoch`: the uncached loader's pick.
    `draws`: the row's `sample_draws(seed, epoch, identity)` when the caller has them already."""
    n = len(cache.caption_variants[row])
    if n == 1:
        return 0
    return variant_position((draws or sample_draws(seed, epoch, cache.identities[row])).caption, n)


def cached_batch(cache: LatentCache, rows: list[int], flipped: list[bool], variants: list[int], *,
                 with_text: bool) -> dict[str, Any]:
    """The batch of cache `rows`, with the given flips and caption variant of each (see CachedLatentLoader)."""
    idx = torch.tensor(rows, dtype=torch.long)  # [B]
    text_ids = torch.tensor([cache.text_rows[i][v] for i, v in zip(rows, variants)], dtype=torch.long) \
        if with_text else None
    batch: dict[str, Any] = cache.gather(idx, torch.tensor(flipped), with_text=with_text, text_ids=text_ids)
    batch["captions"] = [cache.caption_variants[i][v] for i, v in zip(rows, variants)]
    batch["keys"] = [cache.keys[i] for i in rows]
    batch["identities"] = [cache.identities[i] for i in rows]
    batch["original_sizes"] = cache.original_sizes.index_select(0, idx)
    batch["crop_top_left"] = cache.crop_top_left.index_select(0, idx)
    batch["flipped"] = torch.tensor(flipped)
    return batch


class CachedLatentLoader:
    """An endless, resumable stream of cached training batches for process `rank` of `world_size`.

    Batches: {"latent_mean": [B, C, h, w], "latent_std": [B, C, h, w], "text_hidden": [B, L, D]
    (when cached and `with_text` is not False), "captions": list[str], "keys": list[str], "identities":
    list[str], "original_sizes": long [B, 2], "crop_top_left": long [B, 2], "flipped": bool [B]}. A batch may
    span two epochs.
    """

    def __init__(self, cache: LatentCache, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 with_text: bool | None = None, weights: torch.Tensor | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"CachedLatentLoader needs batch_size >= 1 and 0 <= rank < world_size; got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if len(cache) < world_size:
            raise ValueError(f"the cache at {cache.path} has {len(cache)} samples, "
                             f"fewer than the {world_size} processes")
        self.cache, self.batch_size, self.seed, self.rank, self.world_size = cache, batch_size, seed, rank, world_size
        self.with_text = cache.has_text if with_text is None else with_text
        if weights is not None and (weights.shape != (len(cache),) or not bool((weights >= 0).all())
                                    or not float(weights.sum()) > 0):
            raise ValueError(f"CachedLatentLoader weights must be [{len(cache)}] non-negative numbers, not all 0")
        self.cdf = None if weights is None else (weights.double().cumsum(0) / weights.double().sum())  # [N]
        self.share = len(cache) // world_size  # samples per rank per epoch
        self.position = 0  # samples this rank has passed, over all epochs
        self.batches = 0
        self._plan: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.share

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's sample indices [share] long, flip choice of every sample [N] bool) for `epoch`."""
        if self._plan is None or self._plan[0] != epoch:
            n = len(self.cache)
            order_gen = torch.Generator().manual_seed(derived_seed(self.seed, "order", epoch))
            if self.cdf is None:
                order = torch.randperm(n, generator=order_gen)
            else:  # N weighted draws with replacement; searchsorted has no 2**24 limit as multinomial has
                u = torch.rand(n, generator=order_gen, dtype=torch.float64)
                order = torch.searchsorted(self.cdf, u, right=True).clamp_(max=n - 1)
            order = order[self.rank * self.share : (self.rank + 1) * self.share]
            flips = torch.zeros(n, dtype=torch.bool)
            if self.cache.has_flip:
                flip_gen = torch.Generator().manual_seed(derived_seed(self.seed, "flip", epoch))
                flips = torch.rand(n, generator=flip_gen) < 0.5
            self._plan = (epoch, order, flips)
        return self._plan[1], self._plan[2]

    def __iter__(self) -> CachedLatentLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        indices, flipped, variants = [], [], []
        for position in range(self.position, self.position + self.batch_size):
            epoch = position // self.share
            order, flips = self.epoch_plan(epoch)
            index = int(order[position % self.share])
            indices.append(index)
            flipped.append(bool(flips[index]))
            variants.append(chosen_variant(self.cache, index, self.seed, epoch))
        self.position += self.batch_size
        self.batches += 1
        return cached_batch(self.cache, indices, flipped, variants, with_text=self.with_text)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_samples": len(self.cache), "balanced": self.cdf is not None, "position": self.position,
                "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Restore this rank's position; `state` is its own dict or the list of all ranks' dicts."""
        state = own_rank_state(state, self.rank)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"saved cache-loader state has version {state.get('version')}, expected {STATE_VERSION}")
        state = {"balanced": False, **state}  # saved before --data.balance-by existed
        for name in ("seed", "rank", "world_size", "num_samples", "balanced"):
            if state.get(name) != self.state_dict()[name]:
                raise ValueError(
                    f"cannot resume the cached data position: it was saved with {name}={state.get(name)!r}, this "
                    f"run has {name}={self.state_dict()[name]!r}. Resume with the same cache, seed and process count."
                )
        self.position, self.batches = int(state["position"]), int(state["batches"])


def balance_weights(groups: list[str | None], power: float, field: str, keys: list[str] | None = None) -> torch.Tensor:
    """Per-sample weights [N] float64: 1 / (samples sharing its group) ** power.

    power 1: every group is drawn equally often; 0.5: a group's share grows with the square root of
    its size; 0: every sample alike (no balancing). A sample without a value is refused: it would
    otherwise be silently dropped or lumped with others.
    """
    missing = [i for i, g in enumerate(groups) if g is None]
    if missing:
        example = f" (e.g. {keys[missing[0]]!r})" if keys else ""
        raise ValueError(f"--data.balance-by {field}: {len(missing)} of {len(groups)} samples have no {field!r} in "
                         f"their metadata{example}. Add it to every sample (shard .json, metadata.jsonl column or "
                         "dataset column), or balance by another field.")
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1  # type: ignore[index]
    return torch.tensor([counts[g] for g in groups], dtype=torch.float64).pow(-power)  # type: ignore[index]


def own_rank_state(state: dict[str, Any] | list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This rank's entry of a cache loader's saved state (its own dict, or the list of all ranks')."""
    if isinstance(state, list):
        mine = [s for s in state if s.get("rank") == rank]
        if len(mine) != 1:
            raise ValueError(f"the saved cache-loader states hold no single entry for rank {rank}")
        state = mine[0]
    return state
