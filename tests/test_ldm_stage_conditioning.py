"""launch.training.ldm_stage.Batches.condition: the dropout mask comes first, dropped captions are not encoded."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from accelerate import Accelerator

from ldm.conditioning import apply_dropout, dropout_mask


class CountingEncoder:
    """Wraps a FrozenTextEncoder and records every prompt list it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


@pytest.fixture(scope="module")
def batches(captioned_images, tiny_autoencoder, text_encoder):
    from autoencoder import load_autoencoder
    from launch.train_ldm import PRESETS
    from launch.training.ldm_stage import Batches

    cfg = copy.deepcopy(PRESETS["tiny"])
    cfg.data = dataclasses.replace(cfg.data, source=str(captioned_images))
    cfg.run = dataclasses.replace(cfg.run, batch_size=8)
    vae, contract = load_autoencoder(tiny_autoencoder)
    return Batches(cfg, Accelerator(cpu=True), vae.eval().requires_grad_(False), CountingEncoder(text_encoder),
                   contract.to_json_dict())


def test_only_kept_captions_are_encoded_and_the_result_equals_dropping_after(batches, text_encoder):
    null = text_encoder.null_embedding().hidden.float()  # [1, L, D]
    batch = batches.fetch()
    captions = list(batch["captions"])
    dropped = dropout_mask(len(captions), 0.5, torch.Generator().manual_seed(3))
    assert 0 < dropped.sum() < len(captions), "the seed must drop some captions and keep others"
    batches.text_encoder.calls.clear()
    latents, hidden = batches.condition(batch, torch.Generator().manual_seed(0), dropped, null)

    kept = [c for c, d in zip(captions, dropped.tolist()) if not d]
    assert batches.text_encoder.calls == [kept]  # one call, the dropped captions never reach the encoder
    everything = text_encoder.encode(captions).hidden.float()
    assert torch.equal(hidden, apply_dropout(everything, null, dropped))  # what dropping after encoding gives
    assert hidden.dtype == latents.dtype == torch.float32 and latents.shape[0] == len(captions)


def test_everything_dropped_encodes_nothing(batches, text_encoder):
    null = text_encoder.null_embedding().hidden.float()
    batch = batches.fetch()
    batches.text_encoder.calls.clear()
    everything = torch.ones(len(batch["captions"]), dtype=torch.bool)
    _, hidden = batches.condition(batch, torch.Generator().manual_seed(0), everything, null)
    assert batches.text_encoder.calls == []
    assert torch.equal(hidden, null.expand_as(hidden))
