"""Mixed precision: which dtype to compute in, and the autocast context for it."""
from __future__ import annotations

import contextlib

import torch

from ..errors import FmkitError
from ..runtime import fast_bf16


def choose_precision(requested: str, device: str) -> str:
    """Resolve `auto`: bf16 where the hardware runs it fast, else fp16 on older GPUs, else fp32.

    On CPUs bf16 is only worth it with native support (AVX512-BF16/AMX: ~4x fp32); on AVX2-only CPUs it is
    emulated and ~50x slower, so `auto` measures both rather than guessing from flags.
    """
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise FmkitError(f"train.precision must be auto, fp32, bf16 or fp16, got '{requested}'")
    if requested == "fp16" and not device.startswith("cuda"):
        raise FmkitError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if fast_bf16(device) else "fp32"


def autocast(precision: str, device: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
