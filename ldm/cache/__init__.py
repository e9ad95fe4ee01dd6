"""`--cache-latents` / `--cache-text`: encode the training set once, spread over processes, then train
from the cache.

    spec = CacheSpec(data=cfg.data, cache_dir=..., vae_fingerprint=..., text_fingerprint=te.fingerprint)
    cache = ensure_cache(spec, vae=vae, text_encoder=te, rank=r, world_size=n, barrier=acc.wait_for_everyone)
    loader = cached_loader(cache, cfg.data, batch_size=32, seed=0, rank=r, world_size=n)

Modules: `spec` (the one typed CacheSpec and its key), `data_files` (the data files' fingerprint in
the key), `check` (reuse or refuse), `encode` (one batch through the frozen encoders), `shards` (the
bounded, resumable shard writer), `build` (the build over ranks, `ensure_cache`), `reader` (the rows,
in memory or memory-mapped), `loader` (the endless, resumable training stream of a square cache),
`planned` (the same for a bucketed or mixed cache, on the planned loader's schedule; `cached_loader`
picks one).

What is cached, per sample, in the order `data.iterate_once` yields it: see `ldm.cache.encode`
(latents at the sample's bucket size; the embedding of every distinct caption variant). We
keep the posterior (mean, std), not one sample: a fresh latent is drawn every step
(`ldm.cache.loader.sample_latents`), as on-the-fly training draws `latent_dist.sample()`.

A cache fixes the crop: images are centre-cropped (to their bucket, with --data.buckets), whatever
`data.crop` says, so random-crop augmentation is off when training from a cache. Horizontal flips
are kept (both are stored). Tag shuffling cannot be cached (data.DataConfig.shuffles_tags).

On-disk layout of `cache_dir/`:

    build.json                  the plan of the build in progress (key, processes, batch, shard bounds)
    rank000-00000.safetensors   tensors of up to `samples_per_shard` samples (and `max_shard_bytes`) of rank 0
    rank000-00000.json          per sample: keys, captions, caption_variants, identities, sources,
                                buckets, original_sizes, crop_top_left (and text_rows with --cache-text,
                                balance_values with --data.balance-by)
    ...                         (keys and captions are always kept: on-the-fly text encoding needs them)
    rank001-00000.safetensors   rank 1's share, and so on
    rank000.progress.json       each rank's finished shards (sizes, sha256) and where to resume
    null_text.safetensors       null_hidden [1, L, D] (with --cache-text)
    cache_manifest.json         written LAST by rank 0: format, key, sample count, shards + sha256

`open_cache` refuses a cache whose key differs (StaleCacheError names the component and fields).
No manifest means a build never finished: `cache_is_valid` says False and rerunning the build keeps
the finished shards and encodes the rest.
"""

from ldm.cache.build import build_cache, ensure_cache
from ldm.cache.check import (
    MANIFEST_NAME,
    CacheError,
    IncompleteCacheError,
    StaleCacheError,
    cache_is_valid,
    open_cache,
)
from ldm.cache.data_files import data_files_fingerprint
from ldm.cache.loader import CachedLatentLoader, sample_latents
from ldm.cache.planned import CachedPlannedLoader, cached_loader
from ldm.cache.reader import LatentCache
from ldm.cache.spec import CacheSpec

__all__ = [
    "MANIFEST_NAME",
    "CacheError",
    "CacheSpec",
    "CachedLatentLoader",
    "CachedPlannedLoader",
    "IncompleteCacheError",
    "LatentCache",
    "StaleCacheError",
    "build_cache",
    "cache_is_valid",
    "cached_loader",
    "data_files_fingerprint",
    "ensure_cache",
    "open_cache",
    "sample_latents",
]
