"""Which precision a frozen encoder should compute in on a device: ``dtype=auto`` resolved once, here.

Frozen encoders (the text encoder, the autoencoder's encoder in stage 3) never train, so they can run
in bf16 where the hardware does bf16 matrix work faster than fp32, at a small, measured cost in
accuracy (benchmarks/text_encode.py prints it). ``auto`` means:

- CUDA: bf16 where the GPU does it natively (Ampere and later), else fp32;
- CPU: bf16 only with AMX tiles. AVX512-BF16 alone is *not* enough: on the shared Xeon here
  (AVX512-BF16 + AVX512-FP16, no AMX) oneDNN's bf16 matmul ran at 36-60 GFLOP/s against MKL's
  64-119 GFLOP/s in fp32 (one thread, 2464x384 @ 384x1536 and 2464x1024 @ 1024x4096), and a 6-layer
  384-wide CLIP text encoder took 0.80 s instead of 0.58 s per batch of 32 x 77 tokens;
- anything else (MPS, XPU, ...): fp32.

``cpu_has_native_bf16`` answers the narrower hardware question (AMX or AVX512-BF16) that mixed-precision
*training* choices use; this module imports nothing from the project, so ``autoencoder/`` users and
``launch/`` can import it too.
"""

from __future__ import annotations

import torch

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
AUTO = "auto"


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 in hardware (AMX or AVX512-BF16); elsewhere bf16 is emulated and slower."""
    try:  # private helpers, present since torch 2.1; a missing one means "don't know": stay in fp32
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def cpu_has_amx() -> bool:
    """True where the CPU has AMX tiles (Sapphire Rapids and later, when the OS/VM exposes them)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def fastest_frozen_dtype(device: torch.device | str) -> torch.dtype:
    """The precision ``dtype=auto`` picks for a frozen encoder on ``device`` (see the module docstring)."""
    kind = torch.device(device).type
    if kind == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if supported else torch.float32
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_amx() else torch.float32
    return torch.float32


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str) -> torch.dtype:
    """A torch dtype from a dtype, one of ``DTYPE_NAMES``, or ``"auto"`` (``fastest_frozen_dtype(device)``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == AUTO:
        return fastest_frozen_dtype(device)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES) + [AUTO]}")
    return DTYPE_NAMES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', ...: how fingerprints and manifests spell a dtype."""
    return str(dtype).removeprefix("torch.")
