"""Mixed precision: which dtype to compute in, and the autocast context for it."""
from __future__ import annotations

import contextlib
import functools
import time

import torch

from ..errors import FmkitError


def matmul_tflops(dtype: torch.dtype, device: str, n: int = 1024, reps: int = 5) -> float:
    """Dense matmul throughput (TFLOP/s) of an n x n x n product, best of `reps`: the peak MFU is measured against."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


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


@functools.lru_cache(maxsize=None)
def fast_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matmuls beat fp32 here (native bf16, not emulation), decided once per process.

    Native bf16 measures 2-4x fp32 and emulated ~1/50, so the 1.2x line sits far from both; 512-wide products,
    best of 7, keep a busy machine from flipping the answer (256-wide, best of 5, was seen to flip).
    """
    return matmul_tflops(torch.bfloat16, device, n=512, reps=7) > 1.2 * matmul_tflops(torch.float32, device, n=512,
                                                                                      reps=7)


def autocast(precision: str, device: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
