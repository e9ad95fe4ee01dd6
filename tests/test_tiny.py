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
