"""Build a latent cache over every process, resumably, and `ensure_cache`: reuse, build or refuse.

Each rank encodes its share of `data.iterate_once` (stored order, centre crops) into its own shards.
Bucketed or mixed data is read by the planned loader's finite pass: batches of one (source, bucket)
sub-stream each, stored with the sub-stream's source; the list of sub-streams goes into the manifest,
so that the cached loader (`ldm.cache.planned`) schedules the same sub-streams.
A build is resumable: `build.json` records the plan (the key, the process count, the batch size and
the shard bounds); rerunning with the same plan keeps every shard a rank finished and continues
where its `rankRRR.progress.json` says (see `ldm.cache.shards`); another plan starts over. The
manifest is written last, by rank 0: until it exists the folder is not a cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

import data
from foundation import sha256_file, write_bytes_atomic
from ldm.cache.check import MANIFEST_NAME, NULL_TEXT_NAME, CacheError, _differing, cache_is_valid, open_cache, \
    read_manifest
from ldm.cache.encode import ImageEncoder, encode_batch, encode_null_text
from ldm.cache.reader import LatentCache
from ldm.cache.shards import ShardWriter, json_bytes, progress_path
from ldm.cache.spec import CACHE_FORMAT, CacheSpec
from text_encoder import FrozenTextEncoder
from text_encoder.fingerprint import INFORMATIONAL_FIELDS

logger = logging.getLogger(__name__)

PLAN_NAME = "build.json"


def ensure_cache(spec: CacheSpec, *, vae: ImageEncoder, text_encoder: FrozenTextEncoder | None, rank: int,
                 world_size: int, barrier: Callable[[], None]) -> LatentCache:
    """Reuse the cache in `spec.cache_dir` if it matches, build (or finish) it if it is missing or
    unfinished, refuse it if it is stale (StaleCacheError). Every rank must call it: all see the same
    folder and decide alike. `vae`: the autoencoder or its `FrozenEncoder` (whose precision must be in
    `spec.vae_fingerprint`); `text_encoder` is needed when `spec.text_fingerprint` is set."""
    if spec.data.crop == "random" and rank == 0:
        logger.warning("--data.crop random is ignored when training from a latent cache: the cache holds "
                       "centre crops (flips are kept when --data.flip is on).")
    if not cache_is_valid(spec.cache_dir, spec.key):
        build_cache(spec, vae=vae, text_encoder=text_encoder, rank=rank, world_size=world_size, barrier=barrier)
    return open_cache(spec.cache_dir, spec.key, verify_sha256=spec.verify_sha256, in_memory=spec.in_memory)


def build_cache(spec: CacheSpec, *, vae: ImageEncoder, text_encoder: FrozenTextEncoder | None, rank: int,
                world_size: int, barrier: Callable[[], None]) -> dict[str, Any]:
    """Encode this rank's share of the data into `spec.cache_dir`; every rank must call it (it has barriers).

    `barrier` is `accelerator.wait_for_everyone` (a no-op for one process). Returns the manifest (read
    back from disk on every rank).
    """
    _check_encoders(spec, text_encoder)
    if not 0 <= rank < world_size:
        raise ValueError(f"build_cache needs 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    cache_dir = spec.cache_dir
    plan = {"format": CACHE_FORMAT, "key": spec.key, "world_size": world_size, "batch_size": spec.batch_size,
            "samples_per_shard": spec.samples_per_shard, "max_shard_bytes": spec.max_shard_bytes}
    if rank == 0:  # from here on the folder is an unfinished cache until the new manifest appears
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / MANIFEST_NAME).unlink(missing_ok=True)
        _start_or_resume(cache_dir, plan, world_size)
    barrier()
    writer, resume = _resume_point(spec, rank)
    if writer.shards and rank == 0:
        logger.info("resuming the cache build in %s: %d finished shards of rank 0 kept", cache_dir, len(writer.shards))
    if resume is not None:
        _encode_share(spec, vae, text_encoder, rank, world_size, writer, resume)
    if rank == 0 and text_encoder is not None:
        write_bytes_atomic(cache_dir / NULL_TEXT_NAME,
                           safetensors_bytes({"null_hidden": encode_null_text(text_encoder, spec)}))
    barrier()
    if rank == 0:
        _write_manifest(spec, world_size)
    barrier()
    return read_manifest(cache_dir / MANIFEST_NAME)


def _check_encoders(spec: CacheSpec, text_encoder: FrozenTextEncoder | None) -> None:
    if (text_encoder is None) != (spec.text_fingerprint is None):
        raise ValueError("build_cache: pass a text_encoder exactly when the spec has a text_fingerprint "
                         "(text embeddings are cached)")
    if text_encoder is not None:
        differ = _differing(text_encoder.fingerprint, spec.text_fingerprint, ignore=INFORMATIONAL_FIELDS)
        if differ:
            raise ValueError(f"build_cache: the text encoder given is not the one in the spec (fingerprint "
                             f"fields {differ} differ)")


def _start_or_resume(cache_dir: Path, plan: dict[str, Any], world_size: int) -> None:
    """Rank 0: keep the files of an unfinished build with the same plan, else clear them and record the plan."""
    old = None
    if (cache_dir / PLAN_NAME).is_file():
        try:
            old = json.loads((cache_dir / PLAN_NAME).read_text(encoding="utf-8"))
        except ValueError:
            old = None
    same = old == json.loads(json.dumps(plan))
    for path in cache_dir.iterdir():
        owner = _owner(path)
        if owner is not None and (not same or owner >= world_size):
            path.unlink()
    if not same:
        (cache_dir / NULL_TEXT_NAME).unlink(missing_ok=True)
        write_bytes_atomic(cache_dir / PLAN_NAME, json_bytes(plan))


def _owner(path: Path) -> int | None:
    """The rank that wrote `path` (rankRRR-*, rankRRR.*, their hidden temporaries), or None."""
    name = path.name.lstrip(".")
    return int(name[4:7]) if name.startswith("rank") and name[4:7].isdigit() else None


def _resume_point(spec: CacheSpec, rank: int) -> tuple[ShardWriter, dict[str, Any] | None]:
    """This rank's writer with its kept shards, and where to resume: None when its share is finished,
    {"loader": None, "skip": 0} to start from the beginning. Files the progress does not list go."""
    cache_dir = spec.cache_dir
    writer = ShardWriter(cache_dir, rank, spec.samples_per_shard, spec.max_shard_bytes)
    progress = None
    if progress_path(cache_dir, rank).is_file():
        try:
            progress = json.loads(progress_path(cache_dir, rank).read_text(encoding="utf-8"))
        except ValueError:
            progress = None
    if progress is not None and not _shards_intact(cache_dir, progress.get("shards", [])):
        progress = None
    kept = {name for shard in (progress or {}).get("shards", []) for name in shard["files"]}
    kept.add(progress_path(cache_dir, rank).name if progress is not None else "")
    for path in cache_dir.iterdir():
        if _owner(path) == rank and path.name not in kept:
            path.unlink()
    if progress is None:
        return writer, {"loader": None, "skip": 0}
    writer.shards, writer.streams = progress["shards"], progress.get("streams")
    return writer, None if progress["finished"] else progress["resume"]


def _shards_intact(cache_dir: Path, shards: list[dict[str, Any]]) -> bool:
    """Every listed file is there with its size (the sha256 is checked when the finished cache opens)."""
    for shard in shards:
        for name, info in shard["files"].items():
            path = cache_dir / name
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                return False
    return True


def _encode_share(spec: CacheSpec, vae: ImageEncoder, text_encoder: FrozenTextEncoder | None, rank: int,
                  world_size: int, writer: ShardWriter, resume: dict[str, Any]) -> None:
    # The cache fixes the crop (centre) and stores flips itself, so the pass reads unflipped centre crops.
    loader = data.iterate_once(spec.data.replace(crop="center", flip=False), batch_size=spec.batch_size,
                               rank=rank, world_size=world_size, num_workers=spec.num_workers)
    if resume["loader"] is not None:
        loader.load_state_dict(resume["loader"])
    if isinstance(loader, data.PlannedLoader):
        writer.streams = [{"source": st.source, "bucket": None if st.bucket is None else list(st.bucket),
                           "shards": st.shards is not None} for st in loader.streams]
    skip = resume["skip"]
    total = len(range(rank, len(loader.source), world_size)) if loader.source is not None else None
    done = sum(s["num_samples"] for s in writer.shards)
    with tqdm(total=total, initial=done, desc="caching latents", unit="img", disable=rank != 0) as progress:
        before = loader.state_dict()
        for batch in loader:
            after = loader.state_dict()
            stream = getattr(loader, "last_stream", None)  # a planned loader's (source, bucket) of this batch
            writer.add(encode_batch(batch, vae, text_encoder, spec), batch, before, after, skip=skip,
                       source=0 if stream is None else stream.source, bucket=None if stream is None else stream.bucket)
            progress.update(len(batch["keys"]) - skip)
            before, skip = after, 0
    writer.finish()


def _write_manifest(spec: CacheSpec, world_size: int) -> None:
    cache_dir = spec.cache_dir
    shards: list[dict[str, Any]] = []
    streams = None
    for r in range(world_size):
        path = progress_path(cache_dir, r)
        progress = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if not progress.get("finished"):
            raise CacheError(f"rank {r} finished without marking its share done in {path.name}; the cache at "
                             f"{cache_dir} is incomplete. Rerun the same command to finish it.")
        shards += progress["shards"]
        streams = progress.get("streams") if streams is None else streams
    if not shards:
        sources = " + ".join(spec.data.sources) or spec.data.source
        raise CacheError(f"no samples were cached from --data {sources!r}: every sample was unusable.")
    files = {name: info for shard in shards for name, info in shard["files"].items()}
    if (cache_dir / NULL_TEXT_NAME).is_file():
        null_path = cache_dir / NULL_TEXT_NAME
        files[NULL_TEXT_NAME] = {"bytes": null_path.stat().st_size, "sha256": sha256_file(null_path)}
    manifest = {"format": CACHE_FORMAT, "key": spec.key, "num_samples": sum(s["num_samples"] for s in shards),
                "flip": spec.data.flip, "crop": "center", "text": spec.with_text, "built_by_processes": world_size,
                "streams": streams, "buckets": list(spec.data.buckets),
                "shards": [{k: s[k] for k in ("name", "num_samples", "num_texts", "latent_shape")} for s in shards],
                "files": files}
    write_bytes_atomic(cache_dir / MANIFEST_NAME, json_bytes(manifest))
