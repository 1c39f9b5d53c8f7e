"""Process-level settings and hardware probes: allocator tuning, matmul throughput, whether bf16 is native."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_tuned = False


def tune_allocator() -> bool:
    """Stop glibc from mmap-ing and unmapping every large tensor; returns True if the tuning applied.

    Per-step activations and logits sit above glibc's mmap threshold, so without this every training step maps,
    page-faults and unmaps hundreds of MB (30-50% of CPU throughput). Keeping freed memory in the heap costs
    resident memory that would be reused next step anyway. FMKIT_MALLOC_TUNING=0 turns it off for comparisons.
    """
    global _tuned
    if _tuned or os.environ.get("FMKIT_MALLOC_TUNING", "1") == "0":
        return _tuned
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        ok = ok and libc.mallopt(_M_TOP_PAD, 1 << 30)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _tuned = bool(ok)
    return _tuned


def matmul_tflops(dtype, device: str, n: int = 1024, reps: int = 5) -> float:
    """Dense matmul throughput (TFLOP/s) of an n x n x n product, best of `reps`: the peak MFU is measured against."""
    import torch

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


@functools.lru_cache(maxsize=None)
def fast_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matmuls beat fp32 here (native bf16, not emulation), decided once per process.

    Native bf16 measures 2-4x fp32 and emulated ~1/50, so the 1.2x line sits far from both; 512-wide products,
    best of 7, keep a busy machine from flipping the answer (256-wide, best of 5, was seen to flip).
    """
    import torch

    return matmul_tflops(torch.bfloat16, device, n=512, reps=7) > 1.2 * matmul_tflops(torch.float32, device, n=512,
                                                                                      reps=7)


# /proc/cpuinfo flags of bf16 dot-product instructions: x86's AVX512-BF16 and AMX, Arm's BF16 extension
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.lru_cache(maxsize=None)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bf16 dot-product instructions, from the flags Linux lists; None where they cannot be
    read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return bool(_BF16_FLAGS & set(value.split()))
    except OSError:
        return None
    return None


def decode_in_bf16() -> bool:
    """Whether generation on this CPU should compute in bf16. A decoding step reads every weight once per token,
    so halving the bytes pays wherever the CPU has bf16 instructions, even where oneDNN's square bf16 matmuls run
    slower than fp32's. On AVX512-BF16 without AMX, 512-wide matmuls ran at 0.08 against 0.15 TFLOPS, while greedy
    decoding of a 16M model ran 1.2-1.6x faster in bf16 (batch 16 and 1) and a 1.3M one as fast. Where the flags
    cannot be read, the matmul probe decides."""
    has = cpu_has_bf16()
    return has if has is not None else fast_bf16("cpu")
