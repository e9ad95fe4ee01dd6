"""`LatentCache`: the rows of a finished cache (made by `ldm.cache.check.open_cache`, which checks its key).

Two ways to read, picked by size (`in_memory=None`):

* in memory (caches up to `IN_MEMORY_LIMIT_BYTES`): every shard is read once and concatenated, and
  a batch is one `index_select` per tensor: the fastest path, for caches that fit in RAM.
* streamed (larger caches): each shard file is memory-mapped (lazily, read-only, at most
  `MAX_OPEN_SHARDS` at a time) and a batch is one `index_select` per touched shard and tensor, so
  only the rows a batch needs are read and the OS page cache keeps hot shards. Nothing is loaded up
  front; memory stays flat whatever the cache size.

Both return the same batches (a test checks it). Keys, captions and original sizes (a few dozen bytes
per sample) are always held in memory.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

IN_MEMORY_LIMIT_BYTES = 4 << 30  # above this, rows are read from memory-mapped shards on demand
MAX_OPEN_SHARDS = 256
LATENT_NAMES = ("latent_mean", "latent_std")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


class LatentCache:
    """A finished cache folder: N samples, each with its latents (both flips if cached) and text."""

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
        tensor_bytes = sum(info["bytes"] for name, info in manifest["files"].items() if name.endswith(".safetensors")
                           and name.startswith("rank"))
        self.in_memory = tensor_bytes <= IN_MEMORY_LIMIT_BYTES if in_memory is None else in_memory
        self._tensors: dict[str, torch.Tensor] = self._load_all() if self.in_memory else {}
        self._mapped: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
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
        local = indices - self._shard_starts[shards]  # [B] row within its shard
        if len(indices) == 0:
            raise ValueError("gather needs at least one index")
        out: torch.Tensor | None = None
        for shard in shards.unique().tolist():
            where = (shards == shard).nonzero().squeeze(1)  # [b] batch positions served by this shard
            rows = self._shard(shard)[name].index_select(0, local[where])  # [b, ...] copied out of the map
            if out is None:
                out = torch.empty((len(indices), *rows.shape[1:]), dtype=rows.dtype)
            out[where] = rows
        return out  # type: ignore[return-value]  (set by the first shard: indices is not empty)

    def _shard(self, shard: int) -> dict[str, torch.Tensor]:
        """The tensors of one shard as views of its memory-mapped file (least recently used ones unmapped)."""
        if shard in self._mapped:
            self._mapped.move_to_end(shard)
            return self._mapped[shard]
        self._mapped[shard] = map_safetensors(self.path / f"{self.shard_names[shard]}.safetensors")
        if len(self._mapped) > MAX_OPEN_SHARDS:
            self._mapped.popitem(last=False)
        return self._mapped[shard]


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a private, read-only-in-practice memory map.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's dtype,
    shape and byte range, then the data (the writer pads the header so ranges stay aligned).
    """
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    nbytes = path.stat().st_size
    # shared=False maps the file privately (copy-on-write): pages are read on first touch, never written back.
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)  # [nbytes] uint8
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + header_len + offset for offset in info["data_offsets"])
        tensors[name] = flat[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])
    return tensors
