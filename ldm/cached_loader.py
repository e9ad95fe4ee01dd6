"""Training batches from a finished latent cache (built by `ldm.latent_cache`), and latent sampling.

`LatentCache` reads the shards. Two ways, picked by size (`in_memory=None`):

* in memory (caches up to `IN_MEMORY_LIMIT_BYTES`): every shard is read once and concatenated, and
  a batch is one `index_select` per tensor. The demo's 3.4k samples x (4x16x16 latents x 4 + 32x384
  text) are ~60 MB, so this is the fast, simple path.
* per row (larger caches): each shard stays a `safetensors.safe_open` handle and a batch reads its B
  rows one slice at a time. Nothing is loaded up front and the OS page cache keeps hot shards; the
  price is B small reads per tensor per step instead of one gather.

Both return the same batches (a test checks it). Keys, captions and original sizes (a few dozen bytes
per sample) are always held in memory.

`CachedLatentLoader` is the cache's counterpart of `data.build_loader`: an endless stream where epoch
e is a permutation of all N samples seeded by (seed, e), rank r takes the r-th of `world_size` equal
slices of it (N // world_size samples; the remainder sits out that epoch), and whether a sample
shows its flipped latents is drawn per sample index from (seed, e). Its position is one integer, so
`state_dict()` is tiny JSON and a resumed loader yields exactly the batches it would have.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

STATE_VERSION = 1
IN_MEMORY_LIMIT_BYTES = 4 << 30  # above this, rows are read from the shards on demand
LATENT_NAMES = ("latent_mean", "latent_std")


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


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, so (seed, "order", epoch) and (seed, "flip", epoch) never collide."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class LatentCache:
    """A finished cache folder; made by `ldm.latent_cache.open_cache`, which checks its key first."""

    def __init__(self, cache_dir: Path, manifest: dict[str, Any], *, in_memory: bool | None = None) -> None:
        self.path, self.manifest = Path(cache_dir), manifest
        self.num_samples: int = manifest["num_samples"]
        self.has_flip: bool = manifest["flip"]
        self.has_text: bool = manifest["text"]
        self.shard_names = [s["name"] for s in manifest["shards"]]
        sizes = torch.tensor([s["num_samples"] for s in manifest["shards"]])
        self._shard_ends = sizes.cumsum(0)  # [S] global index just past each shard
        self._shard_starts = self._shard_ends - sizes  # [S] global index of each shard's first row
        self.keys: list[str] = []
        self.captions: list[str] = []
        sizes_hw: list[list[int]] = []
        for name in self.shard_names:
            index = json.loads((self.path / f"{name}.json").read_text(encoding="utf-8"))
            self.keys += index["keys"]
            self.captions += index["captions"]
            sizes_hw += index["original_sizes"]
        self.original_sizes = torch.tensor(sizes_hw, dtype=torch.long).reshape(-1, 2)  # [N, 2] (H, W)
        tensor_bytes = sum(info["bytes"] for name, info in manifest["files"].items() if name.endswith(".safetensors"))
        self.in_memory = tensor_bytes <= IN_MEMORY_LIMIT_BYTES if in_memory is None else in_memory
        self._tensors: dict[str, torch.Tensor] = self._load_all() if self.in_memory else {}
        self._handles: dict[int, Any] = {}
        null_path = self.path / "null_text.safetensors"
        self.null_hidden: torch.Tensor | None = load_file(null_path)["null_hidden"] if null_path.is_file() else None

    def __len__(self) -> int:
        return self.num_samples

    @property
    def tensor_names(self) -> list[str]:
        names = list(LATENT_NAMES)
        names += [f"{n}_flip" for n in LATENT_NAMES] if self.has_flip else []
        return names + (["text_hidden"] if self.has_text else [])

    def _load_all(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.tensor_names}
        for shard in self.shard_names:
            tensors = load_file(self.path / f"{shard}.safetensors")
            for name in parts:
                parts[name].append(tensors[name])
        return {name: torch.cat(p) for name, p in parts.items()}

    def gather(self, indices: torch.Tensor, flipped: torch.Tensor, *, with_text: bool) -> dict[str, torch.Tensor]:
        """Rows `indices` [B] (long); where `flipped` [B] (bool), the flipped image's latents.

        Returns latent_mean, latent_std [B, C, h, w] and, with_text, text_hidden [B, L, D], in the
        stored dtype.
        """
        if with_text and not self.has_text:
            raise ValueError(f"the cache at {self.path} holds no text embeddings (built without --cache-text)")
        names = list(LATENT_NAMES) + (["text_hidden"] if with_text else [])
        out = {}
        for name in names:
            if name in LATENT_NAMES and self.has_flip:
                plain, mirrored = self._rows(name, indices), self._rows(f"{name}_flip", indices)
                out[name] = torch.where(flipped[:, None, None, None], mirrored, plain)
            else:
                out[name] = self._rows(name, indices)
        return out

    def _rows(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        if self.in_memory:
            return self._tensors[name].index_select(0, indices)
        shards = torch.searchsorted(self._shard_ends, indices, right=True)  # [B] shard of each row
        rows = []
        for shard, row in zip(shards.tolist(), (indices - self._shard_starts[shards]).tolist()):
            rows.append(self._handle(shard).get_slice(name)[row : row + 1])
        return torch.cat(rows)

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.path / f"{self.shard_names[shard]}.safetensors", framework="pt")
        return self._handles[shard]


class CachedLatentLoader:
    """An endless, resumable stream of cached training batches for process `rank` of `world_size`.

    Batches: {"latent_mean": [B, C, h, w], "latent_std": [B, C, h, w], "text_hidden": [B, L, D]
    (when cached and `with_text` is not False), "captions": list[str], "keys": list[str],
    "original_sizes": long [B, 2], "flipped": bool [B]}. A batch may span two epochs.
    """

    def __init__(self, cache: LatentCache, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 with_text: bool | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"CachedLatentLoader needs batch_size >= 1 and 0 <= rank < world_size; got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if len(cache) < world_size:
            raise ValueError(f"the cache at {cache.path} has {len(cache)} samples, "
                             f"fewer than the {world_size} processes")
        self.cache, self.batch_size, self.seed, self.rank, self.world_size = cache, batch_size, seed, rank, world_size
        self.with_text = cache.has_text if with_text is None else with_text
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
            order = torch.randperm(n, generator=order_gen)[self.rank * self.share : (self.rank + 1) * self.share]
            flips = torch.zeros(n, dtype=torch.bool)
            if self.cache.has_flip:
                flip_gen = torch.Generator().manual_seed(derived_seed(self.seed, "flip", epoch))
                flips = torch.rand(n, generator=flip_gen) < 0.5
            self._plan = (epoch, order, flips)
        return self._plan[1], self._plan[2]

    def __iter__(self) -> CachedLatentLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        indices, flipped = [], []
        for position in range(self.position, self.position + self.batch_size):
            order, flips = self.epoch_plan(position // self.share)
            index = int(order[position % self.share])
            indices.append(index)
            flipped.append(bool(flips[index]))
        self.position += self.batch_size
        self.batches += 1
        idx = torch.tensor(indices, dtype=torch.long)  # [B]
        batch: dict[str, Any] = self.cache.gather(idx, torch.tensor(flipped), with_text=self.with_text)
        batch["captions"] = [self.cache.captions[i] for i in indices]
        batch["keys"] = [self.cache.keys[i] for i in indices]
        batch["original_sizes"] = self.cache.original_sizes.index_select(0, idx)
        batch["flipped"] = torch.tensor(flipped)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_samples": len(self.cache), "position": self.position, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Restore this rank's position; `state` is its own dict or the list of all ranks' dicts."""
        if isinstance(state, list):
            mine = [s for s in state if s.get("rank") == self.rank]
            if len(mine) != 1:
                raise ValueError(f"the saved cache-loader states hold no single entry for rank {self.rank}")
            state = mine[0]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"saved cache-loader state has version {state.get('version')}, expected {STATE_VERSION}")
        for name in ("seed", "rank", "world_size", "num_samples"):
            if state.get(name) != self.state_dict()[name]:
                raise ValueError(
                    f"cannot resume the cached data position: it was saved with {name}={state.get(name)!r}, this "
                    f"run has {name}={self.state_dict()[name]!r}. Resume with the same cache, seed and process count."
                )
        self.position, self.batches = int(state["position"]), int(state["batches"])
