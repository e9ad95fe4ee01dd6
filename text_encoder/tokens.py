"""One tokenisation per prompt: padded, truncated ids and whether each prompt was cut, from the same pass.

A second, untruncated tokenisation only to count over-long prompts cost as much as the first. Fast
(Rust) tokenizers already report what truncation removed (``Encoding.overflowing``); Python
tokenizers are run in the two halves their ``__call__`` is made of (``tokenize`` + ids, then
``prepare_for_model``), so the length before truncation is seen on the way. Either way the ids are the
ones ``tokenizer(prompts, padding="max_length", max_length=L, truncation=True)`` returns, which is what
diffusers' ``encode_prompt`` feeds the text encoder (tests check the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class Tokens:
    ids: torch.Tensor  # [B, L] long
    mask: torch.Tensor  # [B, L] long, 1 = prompt token (specials included), 0 = padding
    truncated: list[bool]  # [B] the prompt was longer than L tokens and was cut


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> Tokens:
    """Pad and truncate ``prompts`` to exactly ``max_length`` tokens, noting which ones were cut."""
    if getattr(tokenizer, "is_fast", False):
        out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        truncated = [bool(e.overflowing) for e in out.encodings]
        return Tokens(out["input_ids"], out["attention_mask"], truncated)
    raw = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    specials = tokenizer.num_special_tokens_to_add()
    rows = [
        tokenizer.prepare_for_model(r, add_special_tokens=True, padding="max_length", truncation=True,
                                    max_length=max_length)
        for r in raw
    ]  # fmt: skip
    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long).reshape(len(rows), max_length)
    mask = torch.tensor([r["attention_mask"] for r in rows], dtype=torch.long).reshape(len(rows), max_length)
    return Tokens(ids, mask, [len(r) + specials > max_length for r in raw])
