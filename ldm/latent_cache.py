"""`--cache-latents` / `--cache-text`: encode the training set once, spread over processes, then train
from the cache (Rombach et al. 2022 train the LDM on a frozen first stage, so its encodings never
change during stage 3 and need computing only once).

What is cached, per sample, in the order `data.iterate_once` yields it:

    latent_mean       [C, h, w]   posterior mean of the autoencoder (its latent contract is folded
    latent_std        [C, h, w]   into its weights, so these are already normalised: no scaling here)
    latent_mean_flip  [C, h, w]   the same for the horizontally flipped image, when data.flip is on:
    latent_std_flip   [C, h, w]   the encoder is not flip-equivariant, so flipped latents are encoded
    text_hidden       [L, D]      the frozen text encoder's hidden states, with --cache-text

We keep the posterior (mean, std), not one sample: a fresh latent `mean + std * eps` is drawn every
step (`ldm.cached_loader.sample_latents`), exactly as on-the-fly training draws `latent_dist.sample()`.

A cache fixes the crop: images are centre-cropped (`crop="center"`), whatever `data.crop` says, so
random-crop augmentation is off when training from a cache. Horizontal flips are kept (both are stored).

On-disk layout of `cache_dir/`:

    rank000-00000.safetensors   tensors above for up to `samples_per_shard` samples of rank 0
    rank000-00000.json          {"keys": [...], "captions": [...], "original_sizes": [[H, W], ...]}
    ...                         (keys and captions are always kept: on-the-fly text encoding needs them)
    rank001-00000.safetensors   rank 1's share, and so on
    rank000.done.json           each rank's list of finished shards with their sizes and sha256
    null_text.safetensors       null_hidden [1, L, D] (with --cache-text), for caption dropout
    cache_manifest.json         written LAST by rank 0: format, key, sample count, shards + sha256

The key (`cache_key`) is the autoencoder fingerprint, the text encoder fingerprint, every DataConfig
field that changes what a sample looks like, and the storage dtype. `open_cache` refuses a cache whose
key differs and names the differing component and fields. No manifest means a build never finished:
`cache_is_valid` says False and rerunning the build rewrites the whole cache.

The data spec is keyed as a string, not by the files' contents: a folder edited in place after the
cache was built is not detected. Delete the cache folder after changing the data itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

import data
from ldm.cached_loader import LatentCache
from text_encoder import FrozenTextEncoder
from text_encoder.fingerprint import INFORMATIONAL_FIELDS

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ldm-latent-cache/1"
MANIFEST_NAME = "cache_manifest.json"
NULL_TEXT_NAME = "null_text.safetensors"
# DataConfig fields that cannot change a cached sample: how failures are budgeted, how an endless
# stream is shuffled, where `datasets` keeps its own cache, and whether shell URLs may run. `crop`
# is excluded because a cache always crops the centre. Every other field, including ones added
# later, is part of the key, so a new pixel-changing option is never silently ignored.
DATA_FIELDS_NOT_KEYED = ("crop", "cache_dir", "max_bad_fraction", "bad_fraction_min_seen", "shuffle_block",
                         "allow_pipe_urls")
_COMPONENT_NAMES = {"vae": "autoencoder", "text_encoder": "text encoder", "data": "data spec",
                    "dtype": "storage dtype", "format": "cache format"}


class CacheError(RuntimeError):
    """A latent cache that cannot be used; the message says why and what to do."""


class IncompleteCacheError(CacheError):
    """No manifest: the build was interrupted (or never ran)."""


class StaleCacheError(CacheError):
    """The cache was built with another autoencoder, text encoder, data spec or dtype."""

    def __init__(self, message: str, component: str, fields: list[str]) -> None:
        super().__init__(message)
        self.component, self.fields = component, fields


def data_key(data_cfg: data.DataConfig) -> dict[str, Any]:
    """The DataConfig fields that change cached pixels or captions, JSON-ready (tuples as lists)."""
    fields = dataclasses.asdict(data_cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if k not in DATA_FIELDS_NOT_KEYED}


def cache_key(data_cfg: data.DataConfig, vae_fingerprint: dict[str, Any], text_fingerprint: dict[str, Any] | None,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """What a cache must have been built with to be reused; pass it to `open_cache`/`cache_is_valid`.

    `text_fingerprint=None` means this run encodes text on the fly: a cache with or without text
    embeddings then matches (captions are always stored).
    """
    if not isinstance(vae_fingerprint, dict) or not vae_fingerprint:
        raise ValueError("cache_key needs the autoencoder's fingerprint as a non-empty dict")
    return {"format": CACHE_FORMAT, "vae": _json_ready(vae_fingerprint),
            "text_encoder": None if text_fingerprint is None else _json_ready(text_fingerprint),
            "data": data_key(data_cfg), "dtype": str(dtype).removeprefix("torch.")}


def _json_ready(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value))  # tuples become lists, so a key compares equal after a round trip


# ----- checking a cache ------------------------------------------------------------------------------


def check_key(cache_dir: Path, built: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise StaleCacheError naming the first component (and its fields) that differs."""
    where = f"the cache at {cache_dir}"
    advice = "delete the folder or pass another --cache-dir"
    if built.get("format") != expected["format"]:
        raise StaleCacheError(f"{where} has format {built.get('format')!r}, this code reads {expected['format']!r}; "
                              f"{advice}.", "format", ["format"])
    for component in ("vae", "data", "dtype"):
        fields = _differing(built.get(component), expected[component], ignore=())
        if fields:
            raise StaleCacheError(_stale_message(where, component, fields, built, expected, advice), component, fields)
    wanted, have = expected["text_encoder"], built.get("text_encoder")
    if wanted is not None and have is None:
        raise StaleCacheError(f"{where} holds no text embeddings (it was built without --cache-text); {advice}.",
                              "text_encoder", ["text_encoder"])
    if wanted is not None:
        fields = _differing(have, wanted, ignore=INFORMATIONAL_FIELDS)
        if fields:
            raise StaleCacheError(_stale_message(where, "text_encoder", fields, built, expected, advice),
                                  "text_encoder", fields)


def _differing(built: Any, expected: Any, ignore: tuple[str, ...]) -> list[str]:
    if not isinstance(built, dict) or not isinstance(expected, dict):
        return [] if built == expected else ["value"]
    keys = sorted((set(built) | set(expected)) - set(ignore))
    return [k for k in keys if built.get(k, "<missing>") != expected.get(k, "<missing>")]


def _stale_message(where: str, component: str, fields: list[str], built: dict, expected: dict, advice: str) -> str:
    def value(side: dict, field: str) -> Any:
        part = side.get(component)
        return part.get(field, "<missing>") if isinstance(part, dict) else part

    names = ", ".join(repr(f) for f in fields)
    details = "; ".join(f"{f}: cache {value(built, f)!r}, this run {value(expected, f)!r}" for f in fields[:3])
    noun = ("fingerprint " if component in ("vae", "text_encoder") else "") + ("field" if len(fields) == 1 else "fields")
    return (f"{where} was built with a different {_COMPONENT_NAMES[component]} ({noun} {names} "
            f"differ{'s' if len(fields) == 1 else ''}: {details}); {advice}.")


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"cannot read the cache manifest {path} ({e}); "
                         "delete its folder and rerun to rebuild it.") from e


def open_cache(cache_dir: str | Path, expected: dict[str, Any], *, verify_sha256: bool = True,
               in_memory: bool | None = None) -> LatentCache:
    """Open a finished cache built with `expected` (from `cache_key`), or raise a CacheError.

    Always checks that every shard file exists with its recorded size; `verify_sha256` also hashes
    them (it reads the whole cache once; turn it off for caches of hundreds of GB). `in_memory`:
    see `ldm.cached_loader` (None picks by size).
    """
    cache_dir = Path(cache_dir)
    manifest = _checked_manifest(cache_dir, expected, verify_sha256)
    return LatentCache(cache_dir, manifest, in_memory=in_memory)


def cache_is_valid(cache_dir: str | Path, expected: dict[str, Any], *, verify_sha256: bool = False) -> bool:
    """Build if missing, reuse if valid, refuse if stale: False when there is no finished cache (build
    it), True when it matches `expected`; StaleCacheError/CacheError when it exists but differs or is
    damaged (never silently rebuilt over: the user chose that folder, and a damaged disk should be seen)."""
    try:
        _checked_manifest(Path(cache_dir), expected, verify_sha256)
    except IncompleteCacheError:
        return False
    return True


def _checked_manifest(cache_dir: Path, expected: dict[str, Any], verify_sha256: bool) -> dict[str, Any]:
    manifest_path = cache_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise IncompleteCacheError(
            f"the cache at {cache_dir} has no {MANIFEST_NAME}: its build was interrupted or never ran. "
            "Rerun the same command with --cache-latents to rebuild it."
        )
    manifest = read_manifest(manifest_path)
    check_key(cache_dir, manifest.get("key", {}), expected)
    for name, info in manifest["files"].items():
        path = cache_dir / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            raise CacheError(f"the cache at {cache_dir} is damaged: {name} is missing or has the wrong size. "
                             "Delete the folder and rerun to rebuild it.")
        if verify_sha256 and _sha256_of_file(path) != info["sha256"]:
            raise CacheError(f"the cache at {cache_dir} is damaged: {name} does not match its sha256 in "
                             f"{MANIFEST_NAME}. Delete the folder and rerun to rebuild it.")
    return manifest


def _sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----- building a cache ------------------------------------------------------------------------------


def _atomic_write(path: Path, payload: bytes) -> dict[str, Any]:
    """Write to a temporary name, fsync, rename: a reader never sees half a file. Returns its size/hash."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8")


@torch.no_grad()
def encode_batch(batch: dict[str, Any], vae: AutoencoderKL, text_encoder: FrozenTextEncoder | None, *, flip: bool,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The cached tensors of one `iterate_once` batch, on the CPU in `dtype`."""
    pixels = batch["pixel_values"].to(vae.device, vae.dtype)  # [B, 3, H, W] in [-1, 1]
    views = {"": pixels, "_flip": pixels.flip(-1)} if flip else {"": pixels}
    out = {}
    for suffix, x in views.items():
        posterior = vae.encode(x).latent_dist  # DiagonalGaussianDistribution; std = exp(0.5 * logvar)
        out[f"latent_mean{suffix}"] = posterior.mean  # [B, C, h, w]
        out[f"latent_std{suffix}"] = posterior.std  # [B, C, h, w]
    if text_encoder is not None:
        out["text_hidden"] = text_encoder.encode(list(batch["captions"])).hidden  # [B, L, D]
    return {k: v.to("cpu", dtype).contiguous() for k, v in out.items()}


class _ShardWriter:
    """Collects one rank's encoded batches and writes a shard every `samples_per_shard` samples."""

    def __init__(self, cache_dir: Path, rank: int, samples_per_shard: int) -> None:
        self.cache_dir, self.rank, self.samples_per_shard = cache_dir, rank, samples_per_shard
        self.tensors: dict[str, list[torch.Tensor]] = {}
        self.index: dict[str, list[Any]] = {"keys": [], "captions": [], "original_sizes": []}
        self.shards: list[dict[str, Any]] = []

    def add(self, tensors: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        for name, value in tensors.items():
            self.tensors.setdefault(name, []).append(value)
        self.index["keys"] += list(batch["keys"])
        self.index["captions"] += list(batch["captions"])
        self.index["original_sizes"] += batch["original_sizes"].tolist()
        while len(self.index["keys"]) >= self.samples_per_shard:
            self.flush(self.samples_per_shard)

    def flush(self, count: int | None = None) -> None:
        """Write the first `count` buffered samples (all when None) as the next shard."""
        n = len(self.index["keys"]) if count is None else count
        if n == 0:
            return
        joined = {name: torch.cat(parts) for name, parts in self.tensors.items()}
        shard = {name: t[:n].contiguous() for name, t in joined.items()}
        self.tensors = {name: [t[n:]] for name, t in joined.items()}
        index = {k: v[:n] for k, v in self.index.items()}
        self.index = {k: v[n:] for k, v in self.index.items()}
        stem = f"rank{self.rank:03d}-{len(self.shards):05d}"
        files = {f"{stem}.safetensors": _atomic_write(self.cache_dir / f"{stem}.safetensors", safetensors_bytes(shard)),
                 f"{stem}.json": _atomic_write(self.cache_dir / f"{stem}.json", _json_bytes(index))}
        self.shards.append({"name": stem, "num_samples": n, "files": files})


def _remove_own_files(cache_dir: Path, rank: int, world_size: int) -> None:
    """Files of an earlier, interrupted build that this rank is responsible for (rank 0 also removes
    those of ranks beyond the current world size)."""
    for path in cache_dir.iterdir():
        owner = path.name.lstrip(".")[4:7]
        if path.name.lstrip(".").startswith("rank") and owner.isdigit():
            if int(owner) == rank or (rank == 0 and int(owner) >= world_size):
                path.unlink()
    if rank == 0:
        (cache_dir / NULL_TEXT_NAME).unlink(missing_ok=True)


def build_cache(data_cfg: data.DataConfig, cache_dir: str | Path, *, vae: AutoencoderKL,
                vae_fingerprint: dict[str, Any], text_encoder: FrozenTextEncoder | None,
                text_fingerprint: dict[str, Any] | None, rank: int, world_size: int, barrier: Callable[[], None],
                batch_size: int = 32, dtype: torch.dtype = torch.float32, samples_per_shard: int = 1024,
                num_workers: int = 0) -> dict[str, Any]:
    """Encode this rank's share of the data into `cache_dir`; every rank must call it (it has barriers).

    `barrier` is `accelerator.wait_for_everyone` (a no-op for one process). `cache_dir` must be a
    folder all processes see. Returns the manifest (read back from disk on every rank).
    """
    if (text_encoder is None) != (text_fingerprint is None):
        raise ValueError("build_cache: pass text_encoder and text_fingerprint together (or neither)")
    if not 0 <= rank < world_size or batch_size < 1 or samples_per_shard < 1:
        raise ValueError(f"build_cache needs 0 <= rank < world_size, batch_size >= 1 and samples_per_shard >= 1; "
                         f"got rank={rank}, world_size={world_size}, batch_size={batch_size}, "
                         f"samples_per_shard={samples_per_shard}")
    cache_dir = Path(cache_dir)
    key = cache_key(data_cfg, vae_fingerprint, text_fingerprint, dtype)
    if rank == 0:  # from here on the folder is an unfinished cache until the new manifest appears
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / MANIFEST_NAME).unlink(missing_ok=True)
    barrier()
    _remove_own_files(cache_dir, rank, world_size)
    shards = _encode_share(data_cfg, cache_dir, vae, text_encoder, rank, world_size, batch_size, dtype,
                           samples_per_shard, num_workers)
    _atomic_write(cache_dir / f"rank{rank:03d}.done.json", _json_bytes({"rank": rank, "shards": shards}))
    if rank == 0 and text_encoder is not None:
        null_hidden = text_encoder.null_embedding().hidden.to("cpu", dtype).contiguous()  # [1, L, D]
        _atomic_write(cache_dir / NULL_TEXT_NAME, safetensors_bytes({"null_hidden": null_hidden}))
    barrier()
    if rank == 0:
        _write_manifest(cache_dir, key, world_size, flip=data_cfg.flip)
    barrier()
    return read_manifest(cache_dir / MANIFEST_NAME)


def _encode_share(data_cfg: data.DataConfig, cache_dir: Path, vae: AutoencoderKL,
                  text_encoder: FrozenTextEncoder | None, rank: int, world_size: int, batch_size: int,
                  dtype: torch.dtype, samples_per_shard: int, num_workers: int) -> list[dict[str, Any]]:
    # The cache fixes the crop (centre) and stores flips itself, so the pass reads unflipped centre crops.
    loader = data.iterate_once(data_cfg.replace(crop="center", flip=False), batch_size=batch_size, rank=rank,
                               world_size=world_size, num_workers=num_workers)
    total = len(range(rank, len(loader.source), world_size)) if loader.source is not None else None
    writer = _ShardWriter(cache_dir, rank, samples_per_shard)
    with tqdm(total=total, desc="caching latents", unit="img", disable=rank != 0) as progress:
        for batch in loader:
            writer.add(encode_batch(batch, vae, text_encoder, flip=data_cfg.flip, dtype=dtype), batch)
            progress.update(len(batch["keys"]))
    writer.flush()
    return writer.shards


def _write_manifest(cache_dir: Path, key: dict[str, Any], world_size: int, *, flip: bool) -> None:
    shards: list[dict[str, Any]] = []
    for r in range(world_size):
        done = cache_dir / f"rank{r:03d}.done.json"
        if not done.is_file():
            raise CacheError(f"rank {r} finished without writing {done.name}; the cache at {cache_dir} is incomplete.")
        shards += json.loads(done.read_text(encoding="utf-8"))["shards"]
    if not shards:
        raise CacheError(f"no samples were cached from --data {key['data']['source']!r}: every sample was unusable.")
    files = {name: info for shard in shards for name, info in shard["files"].items()}
    if (cache_dir / NULL_TEXT_NAME).is_file():
        payload = (cache_dir / NULL_TEXT_NAME).read_bytes()
        files[NULL_TEXT_NAME] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    manifest = {"format": CACHE_FORMAT, "key": key, "num_samples": sum(s["num_samples"] for s in shards),
                "flip": flip, "crop": "center", "text": key["text_encoder"] is not None,
                "built_by_processes": world_size,
                "shards": [{"name": s["name"], "num_samples": s["num_samples"]} for s in shards], "files": files}
    _atomic_write(cache_dir / MANIFEST_NAME, _json_bytes(manifest))


def ensure_cache(data_cfg: data.DataConfig, cache_dir: str | Path, *, vae: AutoencoderKL,
                 vae_fingerprint: dict[str, Any], text_encoder: FrozenTextEncoder | None,
                 text_fingerprint: dict[str, Any] | None, rank: int, world_size: int, barrier: Callable[[], None],
                 batch_size: int = 32, dtype: torch.dtype = torch.float32, samples_per_shard: int = 1024,
                 num_workers: int = 0, verify_sha256: bool = True, in_memory: bool | None = None) -> LatentCache:
    """Reuse the cache in `cache_dir` if it matches, build it if it is missing or unfinished, refuse it
    if it is stale (StaleCacheError). Every rank must call it: all see the same folder and decide alike."""
    expected = cache_key(data_cfg, vae_fingerprint, text_fingerprint, dtype)
    if data_cfg.crop == "random" and rank == 0:
        logger.warning("--data.crop random is ignored when training from a latent cache: the cache holds "
                       "centre crops (flips are kept when --data.flip is on).")
    if not cache_is_valid(cache_dir, expected):
        build_cache(data_cfg, cache_dir, vae=vae, vae_fingerprint=vae_fingerprint, text_encoder=text_encoder,
                    text_fingerprint=text_fingerprint, rank=rank, world_size=world_size, barrier=barrier,
                    batch_size=batch_size, dtype=dtype, samples_per_shard=samples_per_shard, num_workers=num_workers)
    return open_cache(cache_dir, expected, verify_sha256=verify_sha256, in_memory=in_memory)
