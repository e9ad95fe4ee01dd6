"""Stage 2: frozen pretrained text encoders behind one interface (open_clip, CLIP, T5, any HF encoder).

    from text_encoder import load_text_encoder
    te = load_text_encoder("minilm")                   # or "openclip:ViT-H-14@laion2b_s32b_b79k?layer=penultimate"
    te = load_text_encoder("minilm", dtype="auto")     # bf16 where the device does it faster (precision.py)
    emb = te.encode(["a photo of a cat"])              # TextEmbeddings(hidden [B, L, D], mask [B, L], pooled [B, D])
    te.fingerprint                                     # JSON-ready identity, checked with check_fingerprint
    te.export_transformers("pipeline_dir")             # text_encoder/ + tokenizer/ for stock diffusers

The spec syntax is documented in ``text_encoder.spec``.
"""

from text_encoder.encoder import FrozenTextEncoder, TextEmbeddings, load_text_encoder
from text_encoder.fingerprint import FingerprintMismatch, check_fingerprint
from text_encoder.precision import cpu_has_native_bf16, fastest_frozen_dtype, resolve_dtype
from text_encoder.spec import TextEncoderConfig, TextEncoderSpecError, parse_spec

__all__ = [
    "FingerprintMismatch",
    "FrozenTextEncoder",
    "TextEmbeddings",
    "TextEncoderConfig",
    "TextEncoderSpecError",
    "check_fingerprint",
    "cpu_has_native_bf16",
    "fastest_frozen_dtype",
    "load_text_encoder",
    "parse_spec",
    "resolve_dtype",
]
