"""Two real CPU processes (accelerate, gloo) build one latent cache together, reuse it on a second
call, and read disjoint, equal shares of it.

Run as a script under `accelerate launch` this file is the per-process side (`two_process_check`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

N_IMAGES = 12


@pytest.mark.slow
def test_two_processes_build_reuse_and_read_disjoint_shares(tmp_path):
    # imported here: the launched script runs without tests/ on its path
    from tiny import make_captioned_folder, run, two_process_command

    images = make_captioned_folder(tmp_path / "images", n=N_IMAGES, size=24)
    out = tmp_path / "result.json"
    run(two_process_command("tests/test_latent_cache_multiprocess.py", images, tmp_path / "cache", out), timeout=240)
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["num_processes"] == 2
    assert result["shards"] == ["rank000-00000", "rank001-00000"]
    assert result["manifest_unchanged_by_second_call"]
    built = result["keys_by_shard"]
    assert not set(built[0]) & set(built[1]) and len(set(built[0]) | set(built[1])) == N_IMAGES
    read = result["keys_read"]  # one epoch: 12 // 2 = 6 samples per rank, 3 batches of 2
    assert [len(k) for k in read] == [6, 6] and not set(read[0]) & set(read[1])


def two_process_check(images: str, cache_dir: str, out: str) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    import data
    from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
    from ldm.cache import MANIFEST_NAME, CachedLatentLoader, CacheSpec, ensure_cache

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    torch.manual_seed(0)  # both ranks build the same random autoencoder (a real run loads one from disk)
    vae = build_autoencoder(AUTOENCODER_PRESETS["tiny"]).eval()
    cfg = data.DataConfig(source=images, resolution=16)
    spec = CacheSpec(data=cfg, cache_dir=Path(cache_dir), vae_fingerprint={"weights_sha256": "tiny-seed-0"},
                     batch_size=4)
    kwargs = dict(vae=vae, text_encoder=None, rank=accelerator.process_index, world_size=accelerator.num_processes,
                  barrier=accelerator.wait_for_everyone)
    cache = ensure_cache(spec, **kwargs)
    manifest = Path(cache_dir) / MANIFEST_NAME
    stamp = manifest.stat().st_mtime_ns
    accelerator.wait_for_everyone()
    again = ensure_cache(spec, **kwargs)  # valid now: must be reused, not rebuilt
    accelerator.wait_for_everyone()
    loader = CachedLatentLoader(again, batch_size=2, seed=0, rank=accelerator.process_index,
                                world_size=accelerator.num_processes)
    keys = [k for _ in range(3) for k in next(loader)["keys"]]
    read = gather_object([keys])
    if accelerator.is_main_process:
        sizes = [s["num_samples"] for s in cache.manifest["shards"]]
        result = {
            "num_processes": accelerator.num_processes,
            "shards": [s["name"] for s in cache.manifest["shards"]],
            "keys_by_shard": [cache.keys[: sizes[0]], cache.keys[sizes[0]:]],
            "manifest_unchanged_by_second_call": manifest.stat().st_mtime_ns == stamp,
            "keys_read": read,
        }
        Path(out).write_text(json.dumps(result), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # see test_data_distributed.two_process_check: gloo can abort at exit


if __name__ == "__main__":
    two_process_check(sys.argv[1], sys.argv[2], sys.argv[3])
