"""Caption dropout: the one place where training replaces captions by the null condition.

Classifier-free guidance (Ho & Salimans 2022, §3.2) needs one network that is both conditional
and unconditional, so with probability ``p_uncond`` a sample's text embedding is swapped for the
text encoder's null embedding. We swap *embeddings*, after encoding or cache loading, so the
dropout is the same whether embeddings were computed on the fly or read from a cache (baking the
dropout into a cache, as diffusers' SDXL script does, freezes which samples are unconditional).
The null embedding is the one inference uses for the unconditional branch
(``FrozenTextEncoder.null_embedding()``: the encoded empty prompt by default), so training and
guidance agree on what "no caption" means.
"""

from __future__ import annotations

import torch

DEFAULT_P_UNCOND = 0.1  # Ho & Salimans 2022 found 0.1-0.2 best; SD used 0.1.


def drop_captions(
    hidden: torch.Tensor,
    null_hidden: torch.Tensor,
    p_uncond: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's text embedding by ``null_hidden`` with probability ``p_uncond``.

    hidden: [B, L, D] text hidden states; null_hidden: [1, L, D] (or [L, D]).
    Draws B uniforms from ``generator`` (on its device) every call, even when p_uncond is 0, so
    the generator advances the same way whatever p_uncond is.
    Returns (hidden with dropped rows replaced [B, L, D], dropped mask bool [B]).
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], not {p_uncond}")
    if hidden.ndim != 3:
        raise ValueError(f"drop_captions expects hidden states [B, L, D], got shape {tuple(hidden.shape)}")
    if null_hidden.ndim == 2:
        null_hidden = null_hidden.unsqueeze(0)
    if null_hidden.shape[0] != 1 or null_hidden.shape[1:] != hidden.shape[1:]:
        raise ValueError(
            f"null embedding has shape {tuple(null_hidden.shape)} but the captions are "
            f"{tuple(hidden.shape)}; expected [1, {hidden.shape[1]}, {hidden.shape[2]}]. Both must come "
            "from the same text encoder with the same max_length."
        )
    draws = torch.rand(hidden.shape[0], generator=generator, device=generator.device)
    dropped = (draws < p_uncond).to(hidden.device)  # [B]
    null = null_hidden.to(device=hidden.device, dtype=hidden.dtype)
    return torch.where(dropped[:, None, None], null, hidden), dropped
