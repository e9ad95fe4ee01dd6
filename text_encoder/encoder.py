"""``FrozenTextEncoder``: prompts in, the exact conditioning a stock diffusers pipeline computes out.

``encode`` repeats what ``StableDiffusionPipeline.encode_prompt`` does (diffusers 0.42)::

    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    mask = attention_mask if text_encoder.config.use_attention_mask else None
    hidden = text_encoder(ids, attention_mask=mask)[0]                      # [B, L, D]

and ``export_transformers`` writes the very model and tokenizer that ran here, so a pipeline saved
in diffusers layout reproduces the conditioning of training bit for bit.

What makes it cheap on the fly: each distinct prompt of a call is tokenised once (the truncation count
comes from that same pass, ``text_encoder.tokens``) and encoded once, then scattered back to every
place it appears; the forward runs under ``torch.inference_mode`` in the encoder's own precision
(``dtype=auto``: bf16 where the device does it faster, ``text_encoder.precision``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from text_encoder.backend import LoadedEncoder
from text_encoder.fingerprint import sha256_of_config, sha256_of_state_dict, sha256_of_token_ids
from text_encoder.precision import dtype_name, resolve_dtype
from text_encoder.spec import DEFAULT_DTYPE, TextEncoderConfig, parse_spec
from text_encoder.tokens import tokenize

logger = logging.getLogger(__name__)

# Prompts whose token ids identify a tokenizer's behaviour (case, punctuation, unicode, truncation).
_TOKENIZER_PROBES = [
    "", "a photo of a cat", "Two DOGS, playing in the snow at 5 pm!", "naïve café 日本語 🐱", "long " * 600
]


@dataclass
class TextEmbeddings:
    """The conditioning for a batch of prompts, on the encoder's device and dtype."""

    hidden: torch.Tensor  # [B, L, D] what the UNet cross-attends to (L = max_length, padding included)
    mask: torch.Tensor  # [B, L] long, 1 = prompt token (specials included), 0 = padding
    pooled: torch.Tensor | None  # [B, D] one vector per prompt (see FrozenTextEncoder.encode)

    def __len__(self) -> int:
        return self.hidden.shape[0]


class FrozenTextEncoder:
    """A pretrained text encoder that never trains: eval mode, no gradients, fixed prompt length.

    Deliberately not an ``nn.Module``: a parent module's ``.train()``, ``.parameters()`` or
    ``state_dict()`` can never reach it, so it cannot be switched to dropout, handed to an
    optimizer, or saved into a UNet checkpoint by accident.
    """

    def __init__(self, config: TextEncoderConfig, loaded: LoadedEncoder) -> None:
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_length = loaded.max_length
        self.batch_size = config.batch_size
        self._loaded = loaded
        # sha256 of the float32 weights the model's were cast from (see ``fingerprint``); None: not yet
        # computed, and then the model's own weights are those float32 weights (or exactly hold them).
        self._weights_sha256: str | None = loaded.weights_sha256
        self.num_prompts = 0  # prompts encoded so far
        self.num_truncated = 0  # of those, how many were longer than max_length and cut

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)  # the width of ``hidden``, D

    @property
    def uses_attention_mask(self) -> bool:
        """Whether the model sees the padding mask; the diffusers flag ``config.use_attention_mask``."""
        return bool(getattr(self.model.config, "use_attention_mask", False))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FrozenTextEncoder:
        """Move and/or cast the model. From float32 the weights keep their identity (only ``dtype``
        changes in the fingerprint); from a lower precision they do not: bf16 weights cast back to
        float32 are rounded float32 weights, another function, with another ``weights_sha256``."""
        if dtype is not None and dtype != self.dtype:
            if self.dtype == torch.float32:
                self._weights_sha256 = self._weights_sha256 or sha256_of_state_dict(self.model.state_dict())
            else:
                self._weights_sha256 = None  # hashed again from the cast weights when asked
        self.model.to(device=device, dtype=dtype)
        return self

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """Encode ``prompts`` in chunks of ``batch_size``; over-long prompts are cut and counted.

        Repeated prompts are encoded once and copied to each of their places, so the result equals
        encoding every prompt separately. The tensors are in ``self.dtype`` on ``self.device``, and
        are ordinary tensors (not inference tensors) that a trained module's autograd graph may use.
        ``pooled`` is CLIP's own sentence vector for CLIP models (the end-of-text token after the final
        layer norm, ``CLIPTextModel.pooler_output``, without any projection) and the mask-weighted mean
        of ``hidden`` over prompt tokens for every other encoder.
        """
        _check_prompts(prompts)
        return self._encode(list(prompts), count=True)

    def _encode(self, prompts: list[str], count: bool) -> TextEmbeddings:
        if self.model.training:  # dropout would make the "frozen" conditioning random
            raise RuntimeError("the frozen text encoder's model was put in training mode; call .model.eval()")
        if not prompts:
            empty = torch.zeros(0, self.max_length, self.hidden_size, device=self.device, dtype=self.dtype)
            mask = torch.zeros(0, self.max_length, dtype=torch.long, device=self.device)
            return TextEmbeddings(empty, mask, empty[:, 0])
        position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # distinct prompts, first-seen order
        distinct = list(position)
        step = self.batch_size
        chunks = [self._encode_chunk(distinct[i : i + step]) for i in range(0, len(distinct), step)]
        truncated = [cut for c in chunks for cut in c[1]]  # [N distinct]
        rows = [position[p] for p in prompts]  # [B] each prompt's row among the distinct ones
        if count:
            self._count_truncations(sum(truncated[i] for i in rows), len(prompts))
        where = torch.tensor(rows, device=self.device)
        # Gathering outside inference mode gives ordinary tensors, which autograd may save.
        return TextEmbeddings(
            hidden=torch.cat([c[0].hidden for c in chunks]).index_select(0, where),
            mask=torch.cat([c[0].mask for c in chunks]).index_select(0, where),
            pooled=torch.cat([c[0].pooled for c in chunks]).index_select(0, where),
        )

    def _encode_chunk(self, prompts: list[str]) -> tuple[TextEmbeddings, list[bool]]:
        tokens = tokenize(self.tokenizer, prompts, self.max_length)
        ids = tokens.ids.to(self.device)  # [B, L]
        mask = tokens.mask.to(self.device)  # [B, L]
        with torch.inference_mode():
            out = self.model(ids, attention_mask=mask if self.uses_attention_mask else None)
            hidden = out[0]  # [B, L, D]
            if self.model.config.model_type == "clip_text_model":
                pooled = out.pooler_output  # [B, D]
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, D]
        return TextEmbeddings(hidden=hidden, mask=mask, pooled=pooled), tokens.truncated

    def _count_truncations(self, cut: int, num_prompts: int) -> None:
        if cut and not self.num_truncated:
            logger.warning(
                "prompts longer than %d tokens are truncated (counted in FrozenTextEncoder.num_truncated)",
                self.max_length,
            )
        self.num_prompts += num_prompts
        self.num_truncated += cut

    def null_embedding(self) -> TextEmbeddings:
        """The unconditional input for classifier-free guidance, for one prompt ([1, L, D]).

        ``null=empty`` (default): the embedding of the empty prompt "", as diffusers uses for its
        negative prompt. ``null=zeros``: all-zero hidden and pooled vectors (mask of "" kept).
        Not counted in ``num_prompts``.
        """
        empty = self._encode([""], count=False)
        if self.config.null == "zeros":
            return TextEmbeddings(torch.zeros_like(empty.hidden), empty.mask, torch.zeros_like(empty.pooled))
        return empty

    @property
    def fingerprint(self) -> dict[str, Any]:
        """JSON-ready identity; compare with ``check_fingerprint`` (see ``fingerprint.INFORMATIONAL_FIELDS``).

        ``weights_sha256`` names the float32 weights and ``dtype`` the precision they compute in, so
        the same checkpoint loaded in bf16 and in fp32 differs in ``dtype`` alone: a cache compares
        every field (bf16 and fp32 embeddings are never mixed), a pipeline loaded for sampling in
        another precision passes ``ignore=("dtype",)``.
        """
        if self._weights_sha256 is None:  # hashing gigabytes once is enough
            self._weights_sha256 = sha256_of_state_dict(self.model.state_dict())
        probe = self.tokenizer(
            _TOKENIZER_PROBES, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return {
            "backend": self.config.backend,
            "source": self._loaded.source,
            "revision": self._loaded.revision,
            "layer": self.config.layer,
            "architecture": type(self.model).__name__,
            "weights_sha256": self._weights_sha256,
            "config_sha256": sha256_of_config(self.model.config.to_dict()),
            "tokenizer_sha256": sha256_of_token_ids(probe["input_ids"]),
            "max_length": self.max_length,
            "hidden_size": self.hidden_size,
            "attention_mask": self.uses_attention_mask,
            "dtype": dtype_name(self.dtype),
            "null": self.config.null,
        }

    def export_transformers(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/text_encoder/`` and ``out_dir/tokenizer/`` that stock diffusers loads as is.

        The weights are written in float32 whatever ``self.dtype`` is (stock diffusers would otherwise
        load a bf16 text encoder next to an fp32 UNet): for a bf16 encoder they are its bf16 values,
        held exactly in float32, so loading the folder in bf16 computes what this encoder computes.
        """
        out = Path(out_dir)
        dtype = self.dtype
        if dtype != torch.float32:
            self.model.to(torch.float32)  # exact: float32 holds every bf16/fp16 value
        try:
            self.model.save_pretrained(out / "text_encoder")
        finally:
            self.model.to(dtype)  # back, bit for bit
        self.tokenizer.save_pretrained(out / "tokenizer")  # model_max_length == self.max_length
        return out

    def __repr__(self) -> str:
        return (
            f"FrozenTextEncoder({self.config.to_spec()!r}, {type(self.model).__name__}, L={self.max_length}, "
            f"D={self.hidden_size}, {self.dtype}, {self.device})"
        )


def _check_prompts(prompts: list[str]) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"encode() takes a list of prompts, not {type(prompts).__name__}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}")


def load_text_encoder(
    spec: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    default_dtype: torch.dtype | str = DEFAULT_DTYPE,
    **options: Any,
) -> FrozenTextEncoder:
    """Load the frozen encoder a ``--text-encoder`` spec names (syntax: ``text_encoder.spec``).

    ``dtype`` is the precision it computes in: a torch dtype, a name ("fp32", "bf16", ...) or "auto"
    (bf16 where ``device`` does bf16 faster than fp32, ``text_encoder.precision``); it may instead be
    the spec's ``?dtype=``, and it is ``default_dtype`` (float32 unless the caller, e.g. a training
    script, prefers "auto") when neither gives one. ``options`` are the spec's other
    keys as keywords (``layer=``, ``max_length=``, ``revision=``, ``null=``, ``allow_pickle=``,
    ``batch_size=``); giving one both ways is an error.
    """
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    config = parse_spec(spec, dtype=dtype, **options)
    dtype = resolve_dtype(config.dtype or default_dtype, device)
    if config.backend == "openclip":
        from text_encoder.openclip_backend import load_openclip

        loaded = load_openclip(config, device, dtype)
    else:
        from text_encoder.hf_backend import load_hf

        loaded = load_hf(config, device, dtype)
    return FrozenTextEncoder(config, loaded)
