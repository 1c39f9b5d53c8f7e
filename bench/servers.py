"""Server processes for the benchmarks: a free local port, a server started in its own session and stopped
however the benchmark ends, and CPU time read from /proc."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def log_tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def running(argv: list[str], env: dict, log: Path, ready_url: str, timeout: float = 300):
    """Start a server in its own session (a Ctrl-C at the terminal reaches only this script), wait for ready_url
    to answer 200, and always stop it: SIGINT, then SIGTERM, then SIGKILL."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while http_status(ready_url) != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with status {proc.returncode} before it was ready:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f} s:\n{log_tail(log)}")
            time.sleep(0.5)
        yield proc
    finally:
        for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds used: by the whole machine (not idle, not waiting on I/O) or by one process. Linux only; per
    thread, see `thread_times`."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        if pid is None:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
            return (user + nice + system + irq + softirq + steal) / tick
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / tick  # utime, stime, and those of waited-for children
    except (OSError, ValueError):
        return None


def thread_times(pid: int) -> dict[int, tuple[str, float, float]]:
    """Per thread of a process: its name, the seconds it ran on a CPU and the seconds it waited, runnable, for one
    (/proc/PID/task/TID/schedstat). A thread's wall time less both is time asleep: on I/O, a lock, a queue. Linux
    only; {} where unreadable."""
    out = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ran, waited = map(int, f.read().split()[:2])
                out[int(tid)] = (name, ran / 1e9, waited / 1e9)
    return out
