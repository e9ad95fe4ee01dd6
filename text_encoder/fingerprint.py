"""The identity of a frozen text encoder, and the check that refuses a mismatched one.

Stage 3 stores ``FrozenTextEncoder.fingerprint`` (a JSON-ready dict) next to every model and cache it
makes from the embeddings. Loading those later with a different encoder (other weights, other layer,
other max length, other null prompt) must fail loudly: the UNet would otherwise be conditioned on
vectors it never saw, and nothing downstream would notice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# How the encoder was obtained, recorded for people but never compared: a path differs between
# machines, and an encoder exported to a pipeline folder and loaded back with ``hf:`` is the same
# function under another backend name. What it computes is covered by the compared fields: the
# weights' and config's hashes (``layer=penultimate`` drops a block, so it changes both), the
# tokenizer's ids on probe prompts, the prompt length, the dtype and the null prompt.
INFORMATIONAL_FIELDS = ("source", "backend", "revision", "layer")
_VOLATILE_CONFIG_KEYS = ("architectures", "transformers_version", "dtype", "torch_dtype")


class FingerprintMismatch(ValueError):
    """The text encoder in use is not the one that ``context`` was made with."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


def sha256_of_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the weights' values, independent of file format, sharding and lossless dtype casts.

    Hashing tensors, not files, is what lets a model that was exported (re-serialised) and loaded
    back keep its fingerprint. Each tensor is hashed as float32 on the CPU, one at a time.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        h.update(memoryview(tensor.numpy()).cast("B"))
    return h.hexdigest()


def sha256_of_config(config: Mapping[str, Any]) -> str:
    """sha256 of a model config dict, without the fields that name a path, a version or a dtype."""
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def sha256_of_token_ids(ids: torch.Tensor) -> str:
    """sha256 of a tokenizer's ids for fixed probe prompts: same ids, same tokenizer behaviour."""
    return hashlib.sha256(memoryview(ids.to(torch.int64).contiguous().numpy()).cast("B")).hexdigest()


def check_fingerprint(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    context: str,
    ignore: Iterable[str] = (),
) -> None:
    """Raise ``FingerprintMismatch`` naming every differing field (``INFORMATIONAL_FIELDS`` are not compared).

    ``context`` says what was made with ``expected`` (e.g. "the embedding cache in runs/x/cache"),
    so the message tells the user which two things disagree. ``ignore`` lists further fields the
    caller accepts to differ (e.g. ``("dtype",)`` to sample in fp16 from an fp32-trained model).
    """
    skip = set(INFORMATIONAL_FIELDS) | set(ignore)
    keys = sorted((set(expected) | set(actual)) - skip)
    differing = [k for k in keys if expected.get(k, "<missing>") != actual.get(k, "<missing>")]
    if not differing:
        return
    lines = [
        f"  {k}: expected {expected.get(k, '<missing>')!r}, got {actual.get(k, '<missing>')!r}" for k in differing
    ]
    raise FingerprintMismatch(
        f"the text encoder does not match the one {context} was made with; differing fields:\n"
        + "\n".join(lines)
        + f"\n(expected source: {expected.get('source')!r}; this one: {actual.get('source')!r}). "
        "Load the same --text-encoder spec and weights, or rebuild it with this encoder.",
        differing,
    )
