"""The tiny stand-ins the other tests build on (tiny.py, conftest.py) are what they claim to be."""

from __future__ import annotations

import torch
from tiny import MAX_LENGTH, WIDTH


def test_tiny_text_encoders_pad_to_max_length(tiny_clip, tiny_bert):
    from text_encoder import load_text_encoder

    for encoder_dir in (tiny_clip, tiny_bert):
        te = load_text_encoder(f"hf:{encoder_dir}")
        hidden = te.encode(["a cat", "a red flag"]).hidden
        assert hidden.shape == (2, MAX_LENGTH, WIDTH)
        assert not torch.allclose(hidden[0], hidden[1])


def test_builders_write_the_same_bytes_twice_and_seed_or_changes_make_another_autoencoder(tmp_path):
    """Shared session folders rely on the first; the resume checks' "other autoencoder" on the second."""
    import json

    from tiny import make_captioned_folder, sha256, tiny_autoencoder_dir, tiny_clip_dir

    weights = "diffusion_pytorch_model.safetensors"
    images = make_captioned_folder(tmp_path / "images", n=4)
    again = make_captioned_folder(tmp_path / "again", n=4)
    assert [sha256(p) for p in sorted(images.iterdir())] == [sha256(p) for p in sorted(again.iterdir())]
    first, second = tiny_clip_dir(tmp_path / "a"), tiny_clip_dir(tmp_path / "b")
    assert sha256(first / "model.safetensors") == sha256(second / "model.safetensors")

    a = tiny_autoencoder_dir(tmp_path / "vae_a", images)
    assert sha256(a / weights) == sha256(tiny_autoencoder_dir(tmp_path / "vae_b", images) / weights)
    assert sha256(a / weights) != sha256(tiny_autoencoder_dir(tmp_path / "vae_c", images, seed=1) / weights)
    wide = json.loads((tiny_autoencoder_dir(tmp_path / "wide", latent_channels=8) / "latent_contract.json").read_text())
    assert wide["latent_channels"] == 8 and wide["latent_std"] == [1.0] * 8
