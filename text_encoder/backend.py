"""What every backend hands to ``FrozenTextEncoder``: a transformers model + tokenizer, and provenance.

Both backends end in the same place, a transformers text model and tokenizer, because that is what
a diffusers pipeline folder holds. open_clip weights are converted once at load time, so training,
caching and a stock ``StableDiffusionPipeline`` all run the very same modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from text_encoder.fingerprint import sha256_of_state_dict

# Tokenizers without a declared maximum report a huge sentinel (int(1e30)) as ``model_max_length``.
_NO_DECLARED_MAX = 1_000_000


@dataclass
class LoadedEncoder:
    model: PreTrainedModel  # eval mode, requires_grad off, on the requested device and dtype
    tokenizer: PreTrainedTokenizerBase  # model_max_length == max_length
    max_length: int
    revision: str | None  # resolved Hub commit, None for local files
    source: str  # where it came from, for people (not identity)
    weights_sha256: str | None = None  # of the float32 weights before a cast to a lower precision (see freeze)


def resolve_max_length(
    requested: int | None, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, where: str
) -> int:
    """The padded prompt length: the user's ``max_length``, else the tokenizer's declared maximum."""
    declared = int(tokenizer.model_max_length or 0)
    length = requested if requested is not None else declared
    if length <= 0 or length >= _NO_DECLARED_MAX:
        raise ValueError(
            f"the tokenizer of {where} declares no maximum length; add ?max_length=N to the spec "
            "(77 is what Stable Diffusion uses)"
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise ValueError(
            f"max_length={length} is longer than the {positions} positions {where} was trained with; "
            f"use max_length <= {positions}"
        )
    return length


def freeze(
    model: PreTrainedModel, device: torch.device | str, dtype: torch.dtype
) -> tuple[PreTrainedModel, str | None]:
    """Eval mode (no dropout), no gradients, cast to ``dtype``: a fixed function of the prompt.

    ``model`` comes in float32. Returns it with the sha256 of those float32 weights when the cast
    loses precision (hashed before it, so bf16 and fp32 loads of one checkpoint share
    ``weights_sha256``), else None (the fingerprint hashes the model's own weights when asked).
    """
    source_sha = None
    if dtype != next(model.parameters()).dtype:
        source_sha = sha256_of_state_dict(model.state_dict())
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, source_sha


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars while we load (we check keys ourselves).

    Checkpoints legitimately hold more than a text encoder (CLIP's vision tower, T5's decoder, the
    block that ``layer=penultimate`` drops), which transformers prints as a long table of
    "UNEXPECTED" keys. Missing keys are what matter, and those we turn into an error.
    """
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
