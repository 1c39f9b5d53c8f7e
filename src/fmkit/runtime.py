"""Process-level settings that make CPU training fast: allocator tuning and thread counts."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

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
