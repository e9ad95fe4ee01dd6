"""`LatentCache`: the rows of a finished cache (made by `ldm.cache.check.open_cache`, which checks its key).

Two ways to read, picked by size (`in_memory=None`):

* in memory (caches up to `IN_MEMORY_LIMIT_BYTES`): every shard is read once and concatenated, and
  a batch is one `index_select` per tensor: the fastest path, for caches that fit in RAM.
* streamed (larger caches): each shard file is memory-mapped (lazily, read-only, at most
  `MAX_OPEN_SHARDS` at a time) and a batch is one `index_select` per touched shard and tensor, so
  only the rows a batch needs are read and the OS page cache keeps hot shards. Nothing is loaded up
  front; memory stays flat whatever the cache size.

Both return the same batches (a test checks it). Keys, captions, caption variants, identities,
sources, buckets, original sizes and crop corners (a few dozen bytes per sample) are always held
in memory.

Rows of different buckets have latents of different shapes: a shard holds one shape, the in-memory
reader keeps one tensor per shape, and a batch must take its rows from one shape (the planned
loader's batches do). Text embeddings are a table of distinct captions per shard (`text_hidden`
[V, L, D]); `text_rows[i]` lists the table rows (global over the cache) of sample i's variants.
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
        self.streams: list[dict[str, Any]] | None = manifest.get("streams")
        """A bucketed or mixed cache's sub-streams (see ldm.cache.build); None for one square source."""
        shards = manifest["shards"]
        self.shard_names = [s["name"] for s in shards]
        counts = {"rows": torch.tensor([s["num_samples"] for s in shards]),  # [S] samples per shard
                  "text": torch.tensor([s["num_texts"] for s in shards])}  # [S] text-table rows per shard
        self._ends = {kind: c.cumsum(0) for kind, c in counts.items()}  # [S] global index just past each shard
        self._starts = {kind: self._ends[kind] - c for kind, c in counts.items()}  # [S] of each shard's first row
        self.keys: list[str] = []
        self.captions: list[str] = []
        """The caption of each sample in the build's deterministic pass (one of its variants)."""
        self.caption_variants: list[list[str]] = []
        self.identities: list[str] = []
        """What seeded each sample's draws in training (data.stream.process_record)."""
        self.sources: list[int] = []
        self.buckets: list[tuple[int, int] | None] = []
        self.text_rows: list[list[int]] = []
        self.balance_values: list[str | None] = []
        """Each sample's value of the --data.balance-by field the cache was built with (None: none stored)."""
        sizes_hw: list[list[int]] = []
        corners: list[list[int]] = []
        for n, name in enumerate(self.shard_names):
            index = json.loads((self.path / f"{name}.json").read_text(encoding="utf-8"))
            self.keys += index["keys"]
            self.captions += index["captions"]
            self.caption_variants += index["caption_variants"]
            self.identities += index["identities"]
            self.sources += index["sources"]
            self.balance_values += index.get("balance_values", [None] * len(index["keys"]))
            self.buckets += [None if b is None else (b[0], b[1]) for b in index["buckets"]]
            sizes_hw += index["original_sizes"]
            corners += index["crop_top_left"]
            offset = int(self._starts["text"][n])
            self.text_rows += [[offset + r for r in rows] for rows in index.get("text_rows", [])]
        self.original_sizes = torch.tensor(sizes_hw, dtype=torch.long).reshape(-1, 2)  # [N, 2] (H, W)
        self.crop_top_left = torch.tensor(corners, dtype=torch.long).reshape(-1, 2)  # [N, 2] (top, left)
        # The text row of each sample's `captions` entry: what a batch holds when no variant is chosen.
        self.default_text = torch.tensor([rows[variants.index(caption)] for rows, variants, caption
                                          in zip(self.text_rows, self.caption_variants, self.captions)],
                                         dtype=torch.long)  # [N] (empty without text)
        tensor_bytes = sum(info["bytes"] for name, info in manifest["files"].items() if name.endswith(".safetensors")
                           and name.startswith("rank"))
        self.in_memory = tensor_bytes <= IN_MEMORY_LIMIT_BYTES if in_memory is None else in_memory
        self._mapped: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        if self.in_memory:
            self._load_all(shards)
        null_path = self.path / "null_text.safetensors"
        self.null_hidden: torch.Tensor | None = load_file(null_path)["null_hidden"] if null_path.is_file() else None

    def __len__(self) -> int:
        return self.num_samples

    @property
    def tensor_names(self) -> list[str]:
        names = list(LATENT_NAMES)
        return names + ([f"{n}_flip" for n in LATENT_NAMES] if self.has_flip else [])

    def _load_all(self, shards: list[dict[str, Any]]) -> None:
        """One tensor per latent shape (its shards concatenated) and one text table; row -> (shape, offset)."""
        shapes = sorted({tuple(s["latent_shape"]) for s in shards})
        parts: dict[tuple, dict[str, list[torch.Tensor]]] = {g: {n: [] for n in self.tensor_names} for g in shapes}
        texts: list[torch.Tensor] = []
        group, offset = torch.empty(self.num_samples, dtype=torch.long), torch.empty(self.num_samples, dtype=torch.long)
        filled = dict.fromkeys(shapes, 0)
        for n, shard in enumerate(shards):
            tensors = load_file(self.path / f"{shard['name']}.safetensors")
            g = tuple(shard["latent_shape"])
            for name in self.tensor_names:
                parts[g][name].append(tensors[name])
            if "text_hidden" in tensors:
                texts.append(tensors["text_hidden"])
            rows = slice(int(self._starts["rows"][n]), int(self._ends["rows"][n]))
            group[rows] = shapes.index(g)
            offset[rows] = torch.arange(filled[g], filled[g] + shard["num_samples"])
            filled[g] += shard["num_samples"]
        self._groups = [{name: torch.cat(p) for name, p in parts[g].items()} for g in shapes]
        self._row_group, self._row_offset = group, offset
        self._text = torch.cat(texts) if texts else None

    def gather(self, indices: torch.Tensor, flipped: torch.Tensor, *, with_text: bool,
               text_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Rows `indices` [B] (long) of one latent shape; where `flipped` [B] (bool), the flipped image's latents.

        Returns latent_mean, latent_std [B, C, h, w] and, with_text, text_hidden [B, L, D] (table rows
        `text_ids` [B], e.g. the chosen caption variant of each sample; default `default_text`), in
        the stored dtype.
        """
        if len(indices) == 0:
            raise ValueError("gather needs at least one index")
        if with_text and not self.has_text:
            raise ValueError(f"the cache at {self.path} holds no text embeddings (built without --cache-text)")
        out = {}
        for name in LATENT_NAMES:
            if self.has_flip:
                plain, mirrored = self._rows(name, indices), self._rows(f"{name}_flip", indices)
                out[name] = torch.where(flipped[:, None, None, None], mirrored, plain)
            else:
                out[name] = self._rows(name, indices)
        if with_text:
            ids = self.default_text.index_select(0, indices) if text_ids is None else text_ids
            out["text_hidden"] = self._text.index_select(0, ids) if self.in_memory else self._streamed(  # type: ignore[union-attr]
                "text_hidden", ids, "text")
        return out

    def _rows(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        if not self.in_memory:
            return self._streamed(name, indices, "rows")
        groups = self._row_group.index_select(0, indices).unique()
        if len(groups) != 1:
            raise ValueError("a batch must take its rows from one latent shape (one bucket); got rows of "
                             f"{len(groups)} shapes")
        return self._groups[int(groups[0])][name].index_select(0, self._row_offset.index_select(0, indices))

    def _streamed(self, name: str, ids: torch.Tensor, kind: str) -> torch.Tensor:
        shards = torch.searchsorted(self._ends[kind], ids, right=True)  # [B] shard of each row
        local = ids - self._starts[kind][shards]  # [B] row within its shard
        out: torch.Tensor | None = None
        for shard in shards.unique().tolist():
            where = (shards == shard).nonzero().squeeze(1)  # [b] batch positions served by this shard
            rows = self._shard(shard)[name].index_select(0, local[where])  # [b, ...] copied out of the map
            if out is None:
                out = torch.empty((len(ids), *rows.shape[1:]), dtype=rows.dtype)
            elif rows.shape[1:] != out.shape[1:]:
                raise ValueError("a batch must take its rows from one latent shape (one bucket); got "
                                 f"{tuple(out.shape[1:])} and {tuple(rows.shape[1:])}")
            out[where] = rows
        return out  # type: ignore[return-value]  (set by the first shard: ids is not empty)

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
