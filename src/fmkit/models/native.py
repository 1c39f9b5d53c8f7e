"""The compiled decoding step (kernels/decode_step.c): built once per machine with the system C compiler, cached,
loaded with ctypes. Where it cannot be built (no compiler, not Linux/macOS, FMKIT_NATIVE=0) `load()` returns None
and says why in `why_not()`; decoding then stays in PyTorch, which gives the same tokens, slower. A failed compile
is remembered in the cache (a `.failed` file beside where the library would be), so it costs one try, not one per
process.

The library links the OpenMP runtime that PyTorch has already loaded (same soname), so its threads are PyTorch's
intra-op threads rather than a second pool competing for the same cores.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "kernels" / "decode_step.c"
ABI_VERSION = 5
_loaded: list = []  # [library or None] once load() has run
_why = ""


class Model(ctypes.Structure):
    """Mirror of the C `Model`: sizes, then pointers to weights, cache and scratch."""
    _fields_ = [(n, ctypes.c_int64) for n in ("batch", "width", "hidden", "n_heads", "n_kv", "head_dim", "inter",
                                               "n_layers", "cache_len", "threads", "bf16")]
    _fields_ += [("eps", ctypes.c_double), ("embed", ctypes.c_void_p), ("cos", ctypes.c_void_p),
                 ("sin", ctypes.c_void_p)]
    _fields_ += [(n, ctypes.POINTER(ctypes.c_void_p)) for n in ("ln1", "ln2", "wqkv", "wo", "wgu", "wd", "cache")]
    _fields_ += [("norm", ctypes.c_void_p), ("head", ctypes.c_void_p), ("vocab", ctypes.c_int64),
                 ("work", ctypes.c_void_p), ("out16", ctypes.c_void_p)]


def cache_dir() -> Path:
    root = os.environ.get("FMKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fmkit")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature lines (x86 `flags`, Arm `Features`/`CPU part`)."""
    keep = ("flags", "features", "model name", "cpu implementer", "cpu part", "cpu architecture")
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    seen = sorted({ln.strip() for ln in lines if ln.lower().startswith(keep)})
    return "\n".join([platform.machine(), platform.processor(), *seen])


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build() -> Path:
    """Compile the kernel into the cache (once per source, compiler, flags and CPU); returns the library's path.

    -march=native: the library is for this machine only, hence the CPU flags in its cache key. Written to a
    temporary name and renamed, so concurrent first uses never load a half-written file."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc/clang)")
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"decode_step-{key}.so"
    failed = out.with_suffix(".failed")  # a compiler that failed once (e.g. no OpenMP) is not retried every run
    if out.exists():
        return out
    if failed.exists():
        raise OSError(f"{failed.read_text(errors='replace').strip()} (delete {failed} to try again)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                             errors="replace", timeout=120)
        if run.returncode:
            why = f"compiling {SOURCE.name} with {cc} failed: {run.stderr.strip()[-500:]}"
            failed.write_text(why)
            raise OSError(why)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL | None:
    """The compiled step, or None (reason in `why_not()`); built on first use, then loaded from the cache."""
    global _why
    if _loaded:
        return _loaded[0]
    lib = None
    if os.environ.get("FMKIT_NATIVE", "1") == "0":
        _why = "turned off by FMKIT_NATIVE=0"
    elif platform.system() not in ("Linux", "Darwin"):
        _why = f"not built on {platform.system()}"
    else:
        try:
            import torch  # noqa: F401  (PyTorch's OpenMP runtime must be loaded first, see the module docstring)
            lib = ctypes.CDLL(str(build()))
            lib.fm_abi_version.restype = ctypes.c_int64
            if lib.fm_abi_version() != ABI_VERSION:
                raise OSError("stale library in the kernel cache")
            lib.fm_step.argtypes = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
            lib.fm_step.restype = None
            lib.fm_step_rows.argtypes = [ctypes.POINTER(Model), ctypes.c_int64] + [ctypes.c_void_p] * 6
            lib.fm_step_rows.restype = None
            lib.fm_argmax_rows.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
            lib.fm_argmax_rows.restype = None
            lib.fm_work_floats.argtypes = [ctypes.POINTER(Model)]
            lib.fm_work_floats.restype = ctypes.c_int64
        except (OSError, ValueError, subprocess.SubprocessError, AttributeError) as e:
            lib, _why = None, str(e)
    _loaded.append(lib)
    return lib


def why_not() -> str:
    return _why
