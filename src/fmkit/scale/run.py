"""`fmkit scale run PLAN`: every run of a plan through the one pre-training loop, resumable, with one lock file
per run so that several processes (or machines sharing the folder) can work through the same plan."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import FmkitError
from ..train.checkpoint import list_checkpoints
from ..train.pretrain import pretrain


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def _lock(path: Path) -> bool:
    """Take the run's lock file, or say it is held; a lock left by a dead process on this host is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                held = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):   # being written this instant: its owner is alive
                return False
            if held.get("host") != socket.gethostname() or _alive(int(held.get("pid", 0))):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return True
    return False


def scale_run(plan: str, only: list[str] | None = None, workspace: str | None = None) -> Path:
    """Train every run of a plan that is not finished yet, resuming any that stopped part-way; returns the plan.

    Start several of these on one plan and each takes the runs no other holds. Under torchrun every rank trains
    each run together (DDP), in the plan's order, so no locks are taken there.

    Args:
        plan: Plan folder written by `fmkit scale plan`.
        only: Run names to train (default: all); repeat the flag.
        workspace: Workspace folder (default: the plan's recipes' own).
    """
    folder = Path(plan)
    if not (folder / "plan.json").exists():
        raise FmkitError(f"{plan} has no plan.json; write one with `fmkit scale plan`")
    runs = json.loads((folder / "plan.json").read_text())["runs"]
    unknown = set(only or ()) - {r["run"] for r in runs}
    if unknown:
        raise FmkitError(f"--only {', '.join(sorted(unknown))}: not runs of {plan}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for r in runs:
        out = Path(r["out"])
        if (only and r["run"] not in only) or (out / "fmkit.json").exists():
            continue
        lock = folder / "locks" / f"{r['run']}.lock"
        if not distributed and not _lock(lock):
            continue
        try:
            if (out / "fmkit.json").exists():   # finished by another process between the check and the lock
                continue
            pretrain(r["recipe"], resume=bool(list_checkpoints(out / "checkpoints")), workspace=workspace)
        finally:
            if not distributed:
                lock.unlink(missing_ok=True)
    return folder
