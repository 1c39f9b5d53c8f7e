"""The code sandbox: model-written code runs only here, in a separate process that cannot hurt the harness.

What is enforced (Linux):
- a fresh process in its own session, with resource limits: CPU seconds, address space, size of any file it
  writes, no core dumps, and (when the harness runs as root) a process count;
- a wall-clock timeout, after which its whole process group and every process of its user are killed;
- no network: the process gets an empty network namespace (loopback down) when the kernel allows it, and the
  socket module refuses connections in any case;
- a minimal environment (no inherited variables, so no secrets), Python's isolated mode, and a temporary working
  directory that is removed afterwards;
- when the harness runs as root, the code runs under a fresh unprivileged user id, so it cannot signal the
  harness, read other processes' environments, or delete or modify files it does not own. Modules are imported
  before the switch (the interpreter's library may be unreadable to that user); see PRELOAD.
Output is read back capped at `output_kb` each for stdout and stderr.
"""
from __future__ import annotations

import itertools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

PRELOAD = ("math", "cmath", "re", "string", "collections", "collections.abc", "itertools", "functools", "operator",
           "heapq", "bisect", "typing", "random", "statistics", "fractions", "decimal", "datetime", "json", "copy",
           "hashlib", "array", "numbers", "enum", "dataclasses", "abc", "textwrap", "unicodedata", "time", "sys",
           "struct", "io", "traceback", "contextlib", "inspect", "ast", "types", "weakref", "warnings", "calendar",
           "queue", "threading", "base64", "binascii", "zlib", "pprint", "difflib", "shlex", "csv", "uuid",
           "subprocess", "multiprocessing", "shutil", "tempfile", "signal", "socket", "ctypes", "pathlib", "glob",
           "fnmatch", "locale", "secrets", "platform")

# Runs in the child before the code: preload, drop privileges, refuse network, then exec the code as __main__.
BOOT = r"""
import importlib, os, sys
for _m in sys.argv[2].split(","):
    try:
        importlib.import_module(_m)
    except Exception:
        pass
import socket as _socket
def _no_network(*a, **k):
    raise OSError("network access is disabled in the sandbox")
class _NoSocket(_socket.socket):
    def connect(self, *a, **k): _no_network()
    def connect_ex(self, *a, **k): _no_network()
    def bind(self, *a, **k): _no_network()
    def sendto(self, *a, **k): _no_network()
_socket.socket = _NoSocket
_socket.create_connection = _no_network
_socket.create_server = _no_network
_uid = int(sys.argv[1])
if _uid >= 0:
    os.setgroups([])
    os.setgid(_uid)
    os.setuid(_uid)
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f, _m, _uid, _no_network, _NoSocket, importlib
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

CLONE_NEWNET = 0x40000000
try:   # loaded here: importing inside preexec_fn (after fork, other threads holding the import lock) can fail
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None
_uids = itertools.count()
_uid_lock = threading.Lock()


@dataclass
class Limits:
    timeout: float = 10.0        # wall-clock seconds
    cpu_seconds: int = 10
    memory_mb: int = 1024        # address space
    file_mb: int = 16            # largest file the code may write (its captured output included)
    processes: int = 4           # processes and threads the code may start (enforced when run as root)
    output_kb: int = 64          # stdout / stderr kept, each


@dataclass
class SandboxResult:
    status: str                  # passed (exit 0) | failed (non-zero exit) | timeout | killed (by a signal)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    reason: str = ""             # one short line: the exception, the limit hit, or the signal


def _fresh_uid() -> int:
    with _uid_lock:
        return 200_000 + (os.getpid() % 1000) * 1000 + next(_uids) % 1000


def _preexec(limits: Limits, as_root: bool):
    def setup():
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if as_root:
            # counted per user: the fresh uid has only this process, so this caps what the code can spawn
            resource.setrlimit(resource.RLIMIT_NPROC, (1 + limits.processes, 1 + limits.processes))
            if _LIBC is not None:
                _LIBC.unshare(CLONE_NEWNET)   # an empty network namespace; harmless if refused
    return setup


def _kill_uid(uid: int) -> None:
    """Kill every process running as `uid` (a double-forked daemon escapes the process group, not its uid)."""
    for _ in range(3):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    uid_line = next(line for line in f if line.startswith("Uid:"))
                if int(uid_line.split()[1]) == uid:
                    found = True
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, StopIteration, ValueError):
                continue
        if not found:
            return
        time.sleep(0.02)


def _read(path: str, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError:
        return ""
    text = data[:cap].decode("utf-8", "replace")
    return text + ("\n[output truncated]" if len(data) > cap else "")


def _reason(status: str, code: int | None, stderr: str, limits: Limits) -> str:
    if status == "timeout":
        return f"wall-clock timeout after {limits.timeout:g} s"
    if status == "killed":
        sig = signal.Signals(-code).name if code and -code in signal.Signals._value2member_map_ else str(code)
        why = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (CPU time or memory limit)",
               "SIGXFSZ": " (file size limit)", "SIGSEGV": " (crashed, e.g. stack overflow)"}.get(sig, "")
        return f"killed by {sig}{why}"
    if status == "failed":
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith(" ")]
        last = lines[-1] if lines else f"exit code {code}"
        return last.split(":")[0][:120] if ":" in last else last[:120]
    return ""


def run_code(code: str, limits: Limits | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program in the sandbox; never raises for anything the code does."""
    limits = limits or Limits()
    as_root = os.geteuid() == 0
    uid = _fresh_uid() if as_root else -1
    work = tempfile.mkdtemp(prefix="fmkit-sandbox-")
    started = time.perf_counter()
    proc = None
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
        if as_root:
            os.chown(work, uid, uid)
            os.chmod(work, 0o700)
            os.chown(os.path.join(work, "main.py"), uid, uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": work}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", BOOT, str(uid), ",".join(PRELOAD)],
                                    cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    preexec_fn=_preexec(limits, as_root), start_new_session=True, close_fds=True)
            try:
                proc.communicate(stdin.encode(), timeout=limits.timeout)
                status = "passed" if proc.returncode == 0 else ("killed" if proc.returncode < 0 else "failed")
            except subprocess.TimeoutExpired:
                status = "timeout"
        cap = limits.output_kb * 1024
        stdout, stderr = _read(out_path, cap), _read(err_path, cap)
    except OSError as e:   # the harness could not even start the program
        return SandboxResult("failed", None, "", str(e), time.perf_counter() - started, f"could not start: {e}")
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if as_root:
            _kill_uid(uid)
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    code_ = proc.returncode if status != "timeout" else None
    return SandboxResult(status, code_, stdout, stderr, seconds, _reason(status, code_, stderr, limits))


def check_program(program: str, timeout: float = 10.0, limits: Limits | None = None) -> SandboxResult:
    """HumanEval style: `program` = prompt + completion + tests + check(entry_point); passed iff it exits 0."""
    limits = limits or Limits(timeout=timeout)
    return run_code(program, limits)


def run_many(programs: list[str], limits: Limits | None = None, workers: int = 2) -> list[SandboxResult]:
    """Several programs at once (each in its own sandbox); results in input order."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda p: run_code(p, limits), programs))
