"""Caption dropout: the one place where training replaces captions by the null condition.

Classifier-free guidance (Ho & Salimans 2022, §3.2) needs one network that is both conditional
and unconditional, so with probability ``p_uncond`` a sample's text embedding is swapped for the
text encoder's null embedding. We swap *embeddings*, after encoding or cache loading, so the
dropout is the same whether embeddings were computed on the fly or read from a cache (baking the
dropout into a cache, as diffusers' SDXL script does, freezes which samples are unconditional).
The null embedding is the one inference uses for the unconditional branch
(``FrozenTextEncoder.null_embedding()``: the encoded empty prompt by default), so training and
guidance agree on what "no caption" means.

Training draws the mask first (``dropout_mask``) and only then gets the embeddings: on the fly the
text encoder encodes only the kept captions (10% fewer at p_uncond 0.1) and the dropped rows are the
null embedding, which is exactly what replacing their encodings would give (``apply_dropout``).
"""

from __future__ import annotations

import torch

DEFAULT_P_UNCOND = 0.1  # Ho & Salimans 2022 found 0.1-0.2 best; SD used 0.1.


def dropout_mask(batch_size: int, p_uncond: float, generator: torch.Generator) -> torch.Tensor:
    """Which samples lose their caption: bool [B], True with probability ``p_uncond``.

    Draws B uniforms from ``generator`` (on its device) every call, even when p_uncond is 0, so the
    generator advances the same way whatever p_uncond is. Drawn before any caption is encoded, so the
    text encoder can skip the dropped ones (``apply_dropout`` then fills them with the null embedding).
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], not {p_uncond}")
    draws = torch.rand(batch_size, generator=generator, device=generator.device)
    return draws < p_uncond


def apply_dropout(hidden: torch.Tensor, null_hidden: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``hidden`` [B, L, D] with the rows where ``dropped`` [B] is True replaced by ``null_hidden`` [1, L, D]."""
    if hidden.ndim != 3:
        raise ValueError(f"caption dropout expects hidden states [B, L, D], got shape {tuple(hidden.shape)}")
    if null_hidden.ndim == 2:
        null_hidden = null_hidden.unsqueeze(0)
    if null_hidden.shape[0] != 1 or null_hidden.shape[1:] != hidden.shape[1:]:
        raise ValueError(
            f"null embedding has shape {tuple(null_hidden.shape)} but the captions are "
            f"{tuple(hidden.shape)}; expected [1, {hidden.shape[1]}, {hidden.shape[2]}]. Both must come "
            "from the same text encoder with the same max_length."
        )
    if dropped.shape != hidden.shape[:1]:
        raise ValueError(f"dropout mask has shape {tuple(dropped.shape)}, expected [{hidden.shape[0]}]")
    null = null_hidden.to(device=hidden.device, dtype=hidden.dtype)
    return torch.where(dropped.to(hidden.device)[:, None, None], null, hidden)


def drop_captions(
    hidden: torch.Tensor,
    null_hidden: torch.Tensor,
    p_uncond: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's text embedding by ``null_hidden`` with probability ``p_uncond``.

    hidden: [B, L, D] text hidden states; null_hidden: [1, L, D] (or [L, D]). ``dropout_mask`` then
    ``apply_dropout``: the same draws as training's, for embeddings that already exist.
    Returns (hidden with dropped rows replaced [B, L, D], dropped mask bool [B]).
    """
    if hidden.ndim != 3:
        raise ValueError(f"drop_captions expects hidden states [B, L, D], got shape {tuple(hidden.shape)}")
    dropped = dropout_mask(hidden.shape[0], p_uncond, generator).to(hidden.device)  # [B]
    return apply_dropout(hidden, null_hidden, dropped), dropped
