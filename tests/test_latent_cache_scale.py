"""The latent cache at scale: data edited in place is refused, text is stored in bf16 by default,
shards stay under their byte bound, a killed build resumes keeping its finished shards (and ends
byte for byte like an uninterrupted one), and streamed reading equals in-memory reading.

Tiny random autoencoder (`tiny` preset, 16 px), the real `minilm` text encoder cut to 8 tokens,
ten generated PNGs with .txt captions (copied per test where a test edits them).
"""

from __future__ import annotations

import os

import shutil
from pathlib import Path

import pytest
import torch

import _data_fixtures as fx
import data
import ldm.cache.build as build_module
from autoencoder.frozen import FrozenEncoder
from foundation import sha256_file
from ldm.cache import (
    CacheError,
    CacheSpec,
    StaleCacheError,
    build_cache,
    cache_is_valid,
    data_files_fingerprint,
    ensure_cache,
    open_cache,
)

N_IMAGES = 10
VAE_FP = {"weights_sha256": "a" * 64, "config": "tiny"}


def _no_barrier() -> None:
    pass


def _spec(images: Path, cache_dir: Path, flip: bool = True, **changes) -> CacheSpec:
    cfg = data.DataConfig(source=str(images), resolution=16, flip=flip)
    return CacheSpec(data=cfg, cache_dir=cache_dir, vae_fingerprint=VAE_FP, batch_size=3,
                     samples_per_shard=4).replace(**changes)


def _ensure(spec: CacheSpec, vae, text_encoder=None):
    return ensure_cache(spec, vae=vae, text_encoder=text_encoder, rank=0, world_size=1, barrier=_no_barrier)


def test_data_edited_in_place_is_refused_naming_the_data_files(tmp_path, images, vae):
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    spec = _spec(folder, tmp_path / "cache", flip=False)
    _ensure(spec, vae)
    assert cache_is_valid(spec.cache_dir, _spec(folder, spec.cache_dir, flip=False).key)  # untouched: reused

    edits = {
        "an image replaced": lambda: fx.textured(99, (24, 20)).save(folder / "img000.png"),
        "an image added": lambda: fx.textured(98, (24, 20)).save(folder / "sub" / "img777.png"),
        "a caption edited": lambda: (folder / "img002.txt").write_text("another caption\n", encoding="utf-8"),
    }
    for what, edit in edits.items():
        before = data_files_fingerprint(spec.data)
        edit()
        assert data_files_fingerprint(spec.data) != before, what
        fresh = _spec(folder, spec.cache_dir, flip=False)  # a new run stats the files again
        with pytest.raises(StaleCacheError) as caught:
            _ensure(fresh, vae)
        assert caught.value.component == "data_files", what
        for words in ("different set of data files", "the data was edited after the cache was built",
                      "delete the folder or pass another --cache-dir"):
            assert words in str(caught.value), (what, str(caught.value))
    # whoever knows better (a copy without mtimes) can turn the check off; the cache is then reused
    unchecked = _spec(folder, spec.cache_dir, flip=False, check_data_files=False)
    assert unchecked.key["data_files"] is None and cache_is_valid(spec.cache_dir, unchecked.key)


def test_shard_files_are_fingerprinted(tmp_path):
    shards = fx.make_shards(tmp_path / "shards", 2, 3)
    cfg = data.DataConfig(source=str(tmp_path / "shards"), resolution=16)
    before = data_files_fingerprint(cfg)
    assert before["kind"] == "webdataset" and before["files"] == 2 and before["unchecked"] == 0
    fx.write_tar(shards[1], fx.good_members(100, 4))
    assert data_files_fingerprint(cfg)["listing_sha256"] != before["listing_sha256"]
    hub = data_files_fingerprint(data.DataConfig(source="hf:someone/some-set", resolution=16))
    assert hub["files"] == 0 and hub["unchecked"] == 1  # the hub's files are not local: not detected


def test_text_is_stored_in_bf16_by_default_and_the_dtype_is_keyed(tmp_path, images, vae, text_encoder):
    spec = _spec(images, tmp_path, text_fingerprint=text_encoder.fingerprint)
    assert spec.text_dtype == "bfloat16" and spec.latent_dtype == "float32"
    cache = _ensure(spec, vae, text_encoder)
    batch = cache.gather(torch.arange(N_IMAGES), torch.zeros(N_IMAGES, dtype=torch.bool), with_text=True)
    assert batch["text_hidden"].dtype == torch.bfloat16 and batch["latent_mean"].dtype == torch.float32
    reference = text_encoder.encode(cache.captions).hidden  # [N, 8, 384] fp32
    # bf16 rounding of the fp32 encoding: within half a bf16 ulp (2^-9 relative), plus batch-size noise
    torch.testing.assert_close(batch["text_hidden"].float(), reference, rtol=2**-8, atol=1e-5)
    assert cache.null_hidden.dtype == torch.bfloat16
    with pytest.raises(StaleCacheError, match="different storage dtype") as caught:
        open_cache(tmp_path, spec.replace(text_dtype="float32").key)
    assert caught.value.component == "dtype" and caught.value.fields == ["text"]
    # a run that encodes text on the fly does not care how the cached text was stored
    assert cache_is_valid(tmp_path, spec.replace(text_fingerprint=None, text_dtype="float32").key)


def test_the_encoders_precision_is_keyed_through_their_fingerprints(tmp_path, images, vae, text_encoder):
    caches, specs = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        frozen = FrozenEncoder(vae, dtype=dtype)
        specs[dtype] = _spec(images, tmp_path / str(dtype), vae_fingerprint=frozen.fingerprint(VAE_FP))
        caches[dtype] = _ensure(specs[dtype], frozen)
    with pytest.raises(StaleCacheError, match="different autoencoder") as caught:
        open_cache(specs[torch.float32].cache_dir, specs[torch.bfloat16].key)
    assert caught.value.fields == ["encode_dtype"]
    rows, plain = torch.arange(N_IMAGES), torch.zeros(N_IMAGES, dtype=torch.bool)
    a, b = (caches[d].gather(rows, plain, with_text=False) for d in (torch.float32, torch.bfloat16))
    assert not torch.equal(a["latent_mean"], b["latent_mean"])  # bf16 really ran
    for name in ("latent_mean", "latent_std"):
        torch.testing.assert_close(b[name], a[name], atol=0.1, rtol=0.05)
    # an fp32 FrozenEncoder caches what the plain autoencoder does (up to channels-last rounding)
    plain_vae = _ensure(_spec(images, tmp_path / "plain"), vae).gather(rows, plain, with_text=False)
    torch.testing.assert_close(plain_vae["latent_mean"], a["latent_mean"], atol=1e-5, rtol=1e-4)


def test_shards_are_bounded_in_bytes(tmp_path, images, vae):
    per_sample = 4 * (4 * 8 * 8) * 4  # mean, std and their flips: 4 x [4, 8, 8] float32
    spec = _spec(images, tmp_path, samples_per_shard=1000, max_shard_bytes=3 * per_sample + 10)
    cache = _ensure(spec, vae)
    assert [s["num_samples"] for s in cache.manifest["shards"]] == [3, 3, 3, 1]
    for shard in cache.shard_names:
        assert (tmp_path / f"{shard}.safetensors").stat().st_size <= 3 * per_sample + 1024  # + header


def test_killed_build_resumes_keeping_finished_shards(tmp_path, images, vae, text_encoder, monkeypatch):
    spec = _spec(images, tmp_path / "straight", text_fingerprint=text_encoder.fingerprint)
    straight = _ensure(spec, vae, text_encoder)
    real_encode, calls, killed = build_module.encode_batch, [], []

    def encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and not killed:  # batches of 3 into shards of 4: shard 0 (batch 0 + 1 of batch 1) is written
            killed.append(1)
            raise KeyboardInterrupt  # what a kill leaves: nothing after this point ran
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(build_module, "encode_batch", encode)
    resumed_spec = spec.replace(cache_dir=tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        _ensure(resumed_spec, vae, text_encoder)
    first = resumed_spec.cache_dir / "rank000-00000.safetensors"
    kept = first.stat().st_mtime_ns, first.stat().st_ino
    (resumed_spec.cache_dir / ".rank000-00001.safetensors.tmp-deadbeef").write_bytes(b"half a shard")
    calls.clear()
    resumed = _ensure(resumed_spec, vae, text_encoder)
    assert len(calls) == 3  # batch 1 again (its first sample is dropped: already in shard 0), 2, 3
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == kept
    assert not list(resumed_spec.cache_dir.glob(".*tmp*"))
    assert resumed.keys == straight.keys
    for name in straight.manifest["files"]:
        assert sha256_file(resumed_spec.cache_dir / name) == sha256_file(spec.cache_dir / name), name

    # another plan (here another batch size) cannot reuse the shards: the build starts over
    (resumed_spec.cache_dir / "cache_manifest.json").unlink()
    calls.clear()
    _ensure(resumed_spec.replace(batch_size=5), vae, text_encoder)
    assert len(calls) == 2 and first.stat().st_ino != kept[1]


def test_streamed_reading_equals_in_memory(tmp_path, images, vae, text_encoder):
    spec = _spec(images, tmp_path, text_fingerprint=text_encoder.fingerprint)
    _ensure(spec, vae, text_encoder)
    loaded = open_cache(tmp_path, spec.key, in_memory=True)
    streamed = open_cache(tmp_path, spec.key, in_memory=False)
    assert loaded.in_memory and not streamed.in_memory
    rows = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(0))  # across all three shards
    flips = torch.rand(N_IMAGES, generator=torch.Generator().manual_seed(1)) < 0.5
    a, b = loaded.gather(rows, flips, with_text=True), streamed.gather(rows, flips, with_text=True)
    for name in ("latent_mean", "latent_std", "text_hidden"):
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert torch.equal(streamed.gather(rows[:1], flips[:1], with_text=False)["latent_std"], a["latent_std"][:1])


def test_spec_refuses_bad_values(tmp_path, images):
    with pytest.raises(ValueError, match="text_dtype='int8'.*max_shard_bytes=0"):
        _spec(images, tmp_path, text_dtype="int8", max_shard_bytes=0)
    with pytest.raises(ValueError, match="non-empty dict"):
        _spec(images, tmp_path, vae_fingerprint={})
    with pytest.raises(ValueError, match="text_fingerprint"):
        build_cache(_spec(images, tmp_path), vae=None, text_encoder=object(), rank=0, world_size=1,
                    barrier=_no_barrier)


_KILLED_BUILD = """
import os, signal, sys
from pathlib import Path
import torch
import data
import ldm.cache.build as build_module
from autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from ldm.cache import CacheSpec, build_cache

real, calls = build_module.encode_batch, []

def encode(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

build_module.encode_batch = encode
torch.set_num_threads(1)  # as the test process (conftest): other thread counts round convolutions differently
torch.manual_seed(0)
vae = build_autoencoder(AUTOENCODER_PRESETS["tiny"]).eval()
cfg = data.DataConfig(source=sys.argv[1], resolution=16, flip=True)
spec = CacheSpec(data=cfg, cache_dir=Path(sys.argv[2]), vae_fingerprint={"weights_sha256": "a" * 64, "config": "tiny"},
                 batch_size=3, samples_per_shard=4)
build_cache(spec, vae=vae, text_encoder=None, rank=0, world_size=1, barrier=lambda: None)
"""


def test_sigkilled_build_resumes_to_the_same_bytes(tmp_path, images, vae):
    import subprocess
    import sys

    straight = _spec(images, tmp_path / "straight")
    _ensure(straight, vae)
    killed = straight.replace(cache_dir=tmp_path / "killed")
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(images), str(killed.cache_dir)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed.cache_dir / "rank000-00000.safetensors").is_file()
    assert not (killed.cache_dir / "cache_manifest.json").exists() and not cache_is_valid(killed.cache_dir, killed.key)
    resumed = _ensure(killed, vae)
    assert len(resumed) == N_IMAGES
    for name in resumed.manifest["files"]:
        assert sha256_file(killed.cache_dir / name) == sha256_file(straight.cache_dir / name), name


def test_large_caches_are_checked_by_size_only_unless_asked(tmp_path, images, vae, monkeypatch):
    import ldm.cache.check as check_module

    spec = _spec(images, tmp_path, flip=False)
    _ensure(spec, vae)
    shard = tmp_path / "rank000-00000.safetensors"
    payload = bytearray(shard.read_bytes())
    payload[-1] ^= 0xFF
    shard.write_bytes(bytes(payload))
    with pytest.raises(CacheError, match="does not match its sha256"):
        _ensure(spec, vae)  # verify_sha256=None: a small cache is hashed
    monkeypatch.setattr(check_module, "VERIFY_LIMIT_BYTES", 100)
    assert len(_ensure(spec, vae)) == N_IMAGES  # "large": sizes only
    with pytest.raises(CacheError, match="does not match its sha256"):
        _ensure(spec.replace(verify_sha256=True), vae)
