"""Fixtures every test module gets by naming them (pytest finds this file; nothing imports it).

The builders behind them are plain functions in `tiny.py`, for fixtures and scripts that need other
sizes or their own folders. The session-wide folders are built once and shared: read them, and copy
one before changing anything in it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tiny


@pytest.fixture(autouse=True, scope="session")
def single_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run ~10x faster on one thread than on two
    (measured: 0.04 s vs 0.5 s per tiny UNet call under load). Restored at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP text encoder folder (``hf:`` spec): character tokens, width 32, 12 positions."""
    return tiny.tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT text encoder folder (``hf:`` spec): letter WordPieces, width 32, 12 positions."""
    return tiny.tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The text-encoder tests' ``hf:`` folders by name: ``clip``, ``t5``, ``bert`` (tiny.tiny_encoder_dirs)."""
    return tiny.tiny_encoder_dirs(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def captioned_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 coloured discs and squares at 32 px with their captions: the entry points' training data."""
    return tiny.make_captioned_folder(tmp_path_factory.mktemp("captioned") / "images")


@pytest.fixture(scope="session")
def tiny_autoencoder(tmp_path_factory: pytest.TempPathFactory, captioned_images: Path) -> Path:
    """A stage-1 folder: the random ``tiny`` autoencoder with statistics measured on ``captioned_images``."""
    return tiny.tiny_autoencoder_dir(tmp_path_factory.mktemp("tiny_autoencoder") / "vae", captioned_images)


@pytest.fixture(scope="session")
def tiny_pipeline_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a saved untrained tiny pipeline (``pipe/``, CLIP text encoder) and the stage
    folders it was composed from (``clip/``, ``vae/``)."""
    root = tmp_path_factory.mktemp("tiny_pipeline")
    tiny.tiny_pipeline(root).save_pretrained(root / "pipe")
    return root


# The in-memory frozen stages the latent-cache and frozen-encoder tests encode with: built per
# module (as each module did before), since some tests move or cast them in place.


@pytest.fixture(scope="module")
def vae():
    """The random ``tiny`` AutoencoderKL (seed 0), in eval mode; read only."""
    from autoencoder import AUTOENCODER_PRESETS, build_autoencoder

    torch.manual_seed(0)
    return build_autoencoder(AUTOENCODER_PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def text_encoder():
    """The packaged MiniLM at 8 tokens (fast, offline)."""
    from text_encoder import load_text_encoder

    return load_text_encoder("minilm", max_length=8)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten distinct 24x20 images with captions: small enough to cache in a second."""
    import _data_fixtures as fx

    root = tmp_path_factory.mktemp("cache_images")
    fx.make_image_folder(root, 10, size=(24, 20))
    return root
