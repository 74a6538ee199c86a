"""Numeric precision and memory layout for training and inference.

"auto" runs the network in bfloat16 autocast where the hardware computes it
natively — CUDA GPUs, and CPUs with AMX or AVX512-BF16 (Intel Sapphire
Rapids and later, AMD Zen 4 and later) through oneDNN — and in float32
elsewhere, where bfloat16 would be emulated and slower. The 3-D convolutions
also run channels-last (NDHWC), which oneDNN and cuDNN prefer. Measured on
this project's 2-core CI CPU (AMX): one paper-configuration S-Net chunk
12.7 s float32 -> 9.9 s channels-last -> 4.6 s bfloat16 channels-last, and a
phantom-cpu training step 2.0 s -> 0.64 s (benchmarks/speed.py prints the
whole-CT figures). Losses, soft-max probabilities and metrics stay float32.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """True where oneDNN has bfloat16 instructions (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def resolve(precision: str, device: str) -> str:
    """The precision "auto" means on ``device`` ("cpu", "cuda", "cuda:1")."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def autocast(precision: str, device: str):
    """The autocast context for a resolved precision (a no-op for float32)."""
    if precision != "bfloat16":
        return nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def channels_last(x):
    """A module or a 5-D tensor in channels-last-3d layout (values unchanged)."""
    if isinstance(x, torch.Tensor) and x.dim() != 5:
        return x
    return x.to(memory_format=torch.channels_last_3d)
