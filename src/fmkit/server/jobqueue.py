"""The fine-tuning queue: validate each new job's files, run up to `max_jobs` jobs at once, each in its own worker
process (outside the request path), and never leave a job `running` without a worker.

The queue lives in SQLite (store.py), so it outlives any process. One server per workspace runs it (a lock file
says which); another server on the same workspace records jobs and takes the queue over when the first stops. A
worker that dies (a crash, `kill -9`) is noticed and its job continues from its last checkpoint, up to `retries`
times, then fails with the reason. When
the server stops, its workers checkpoint and their jobs go back to `queued`; when it starts again it picks them up,
and waits for any worker of the last server still finishing its checkpoint first.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import FmkitError
from .files import describe, training_problems
from .store import Store

UNFINISHED = ("validating_files", "queued", "running", "paused")


class Orphan:
    """A worker left by the previous server: not our child, so only whether it is alive can be known."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self):
        try:
            os.kill(self.pid, 0)
            return None
        except ProcessLookupError:
            return "gone"

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def send_signal(self, sig):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def wait(self, timeout=None):
        end = time.monotonic() + (timeout or 0)
        while self.poll() is None:
            if time.monotonic() > end:
                raise subprocess.TimeoutExpired("worker", timeout)
            time.sleep(0.1)


def last_step(store: Store, job_id: str) -> int:
    from ..train.checkpoint import STEP_RE, list_checkpoints

    found = list_checkpoints(store.jobs_dir / job_id / "model" / "checkpoints")
    return int(STEP_RE.match(found[-1].name).group(1)) if found else 0


def plan_of(job: dict, examples: int) -> dict:
    """Epochs, batch size and steps from the job's hyperparameters ("auto" resolved) and its example count."""
    kind = job["method"]["type"]
    hp = dict(job["method"][kind]["hyperparameters"])
    auto = {"n_epochs": 3, "batch_size": max(1, min(32, math.ceil(examples / 10))), "learning_rate_multiplier": 1.0,
            "beta": 0.1}
    hp = {k: auto[k] if v == "auto" else v for k, v in hp.items()}
    per_epoch = math.ceil(examples / hp["batch_size"])
    return {"examples": examples, "hyperparameters": hp, "steps_per_epoch": per_epoch,
            "steps": per_epoch * hp["n_epochs"]}


class Queue:
    def __init__(self, store: Store, max_jobs: int = 1, retries: int = 2, workspace: str | None = None):
        self.store, self.max_jobs, self.retries, self.workspace = store, max_jobs, retries, workspace
        self.workers: dict[str, subprocess.Popen | Orphan] = {}
        self.lock = threading.RLock()
        self.wakeup, self.stopping = threading.Event(), False
        self.lock_file, self.running = open(store.root / "queue.lock", "a"), False
        self.thread = threading.Thread(target=self._run, name="fmkit-jobs", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        self.wakeup.set()

    def _run(self) -> None:
        while not self.stopping:
            try:
                self.tick()
            except Exception as e:   # the queue must keep running; the reason goes to the log
                print(f"fmkit job queue: {type(e).__name__}: {e}", file=sys.stderr)
            self.wakeup.wait(0.5)
            self.wakeup.clear()

    def tick(self) -> None:
        with self.lock:
            if not self.running:
                try:
                    fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return   # another server runs this workspace's queue
                self.running = True
                self._recover()
            for job in self.store.jobs_in("validating_files"):
                self._validate(job)
            self._reap()
            for job in self.store.jobs_in("queued"):
                if len(self.workers) >= self.max_jobs or self.stopping:
                    break
                self._start(job)

    # ---- states -----------------------------------------------------------------------------------------------
    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        if self.store.update("jobs", job_id, UNFINISHED, status="failed", finished_at=int(time.time()),
                             estimated_finish=None, error={"code": code, "message": message, "param": param}):
            self.store.event(job_id, f"Fine-tuning job failed: {message}", "error")

    def _validate(self, job: dict) -> None:
        kind = job["method"]["type"]
        self.store.event(job["id"], f"Validating training file: {job['training_file']}")
        counts = {}
        for param in ("training_file", "validation_file"):
            file_id = job[param]
            if file_id is None:
                continue
            row = self.store.get("files", file_id)
            if row is None or not Path(row["path"]).is_file():
                return self._fail(job["id"], "file_not_found", f"the {param.replace('_', ' ')} {file_id} was "
                                  "deleted before the job started", param)
            n, problems = training_problems(Path(row["path"]), kind)
            if problems or not n:
                what = f"the {param.replace('_', ' ')} {file_id} ({row['filename']})"
                return self._fail(job["id"], f"invalid_{param}", describe(problems, what) if problems else
                                  f"{what} holds no examples for a {kind} job", param)
            counts[param] = n
        plan = plan_of(job, counts["training_file"])
        method = {**job["method"], kind: {"hyperparameters": plan["hyperparameters"]}}
        if self.store.update("jobs", job["id"], ("validating_files",), status="queued", plan=plan, method=method):
            self.store.event(job["id"], f"Files validated: {plan['examples']} examples, {plan['steps']} steps "
                             f"({plan['hyperparameters']['n_epochs']} epochs of {plan['steps_per_epoch']}); "
                             "moving job to queued state")

    def _start(self, job: dict) -> None:
        if not self.store.update("jobs", job["id"], ("queued",), status="running", want=None, pid=None):
            return
        folder = self.store.jobs_dir / job["id"]
        folder.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(folder / "worker.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "fmkit.server.worker", str(self.store.root), job["id"],
                                     self.workspace or ""], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        self.workers[job["id"]] = proc
        self.store.update("jobs", job["id"], pid=proc.pid)

    def _reap(self) -> None:
        """Workers that have exited: one whose job still says running died without a word."""
        for job_id, proc in list(self.workers.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.workers[job_id]
            job = self.store.get("jobs", job_id)
            if job is None or job["status"] != "running":
                continue
            how = ("stopped while the server was away" if code == "gone" else f"was killed by signal "
                   f"{signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
            attempts = job["attempts"] + 1
            log = self.store.jobs_dir / job_id / "worker.log"
            if attempts > self.retries:
                self._fail(job_id, "worker_failed", f"the worker process {how}, {attempts} times; its output is "
                           f"in {log}")
                continue
            step = last_step(self.store, job_id)
            if self.store.update("jobs", job_id, ("running",), status="queued", attempts=attempts, pid=None):
                self.store.event(job_id, f"The worker process {how}; the job continues from "
                                 + (f"its checkpoint at step {step}" if step else "the start"), "warn")

    def _recover(self) -> None:
        """Jobs the last server left running: wait for a worker still alive, requeue the others."""
        for job in self.store.jobs_in("running"):
            pid = job["pid"]
            if pid and _is_worker(pid, job["id"]):
                self.workers[job["id"]] = Orphan(pid)
                continue
            step = last_step(self.store, job["id"])
            if self.store.update("jobs", job["id"], ("running",), status="queued", pid=None):
                self.store.event(job["id"], "The server restarted; the job continues from "
                                 + (f"its checkpoint at step {step}" if step else "the start"), "warn")

    # ---- requests ---------------------------------------------------------------------------------------------
    def _worker(self, job_id: str):
        """This job's worker: ours, or one another server (on this machine) started."""
        proc = self.workers.get(job_id)
        if proc is None:
            pid = (self.store.get("jobs", job_id) or {}).get("pid")
            proc = Orphan(pid) if pid and _is_worker(pid, job_id) else None
        return proc

    def cancel(self, job_id: str) -> None:
        with self.lock:
            now, proc = int(time.time()), self._worker(job_id)
            if self.store.update("jobs", job_id, UNFINISHED, status="cancelled", want="cancel", finished_at=now,
                                 estimated_finish=None):
                self.workers.pop(job_id, None)
                if proc is not None:
                    proc.kill()
                    proc.wait(30)
                self.store.event(job_id, "Fine-tuning job cancelled")

    def pause(self, job_id: str, wait: float = 120) -> None:
        with self.lock:
            if self.store.update("jobs", job_id, ("validating_files", "queued"), status="paused"):
                self.store.event(job_id, "Fine-tuning job paused")
                return
            proc = self._worker(job_id)
            if proc is None or not self.store.update("jobs", job_id, ("running",), want="pause"):
                return
            proc.send_signal(signal.SIGTERM)   # the worker saves a checkpoint and says paused
        end = time.monotonic() + wait
        while time.monotonic() < end and (self.store.get("jobs", job_id) or {}).get("status") == "running":
            time.sleep(0.1)
        self.wake()

    def resume(self, job_id: str) -> None:
        if self.store.update("jobs", job_id, ("paused",), status="queued", want=None):
            self.store.event(job_id, f"Fine-tuning job resumed; it continues from step "
                             f"{last_step(self.store, job_id)}")
            self.wake()

    def stop(self, wait: float = 60) -> None:
        """Stop taking jobs; running workers checkpoint and their jobs go back to queued."""
        self.stopping = True
        self.wake()
        with self.lock:
            for proc in self.workers.values():
                proc.send_signal(signal.SIGTERM)
            for proc in list(self.workers.values()):
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.thread.join(5)
        self.lock_file.close()   # and with it the lock: another server may take the queue over


def _is_worker(pid: int, job_id: str) -> bool:
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Platform:
    """What the files and jobs routes share: the store and the queue (both made when first needed, so a server
    that never uses them writes nothing), the tenant of a request, and fine-tuned model names."""

    def __init__(self, pool, workspace: str | Path | None, max_jobs: int = 1, retries: int = 2):
        from ..workspace import default_root

        self.pool, self.workspace, self.max_jobs, self.retries = pool, workspace, max_jobs, retries
        self.root = Path(workspace or default_root()) / "platform"
        self._store: Store | None = None
        self._queue: Queue | None = None
        self.lock = threading.Lock()
        self.body_of = None   # the app's JSON body reader, set by the app
        pool.lookup = self.lookup

    @property
    def exists(self) -> bool:
        """Whether anything was ever uploaded here (before that, nothing is written and nothing is looked up)."""
        return (self.root / "platform.db").is_file()

    @property
    def store(self) -> Store:
        with self.lock:
            if self._store is None:
                self._store = Store(self.root)
            return self._store

    @property
    def queue(self) -> Queue:
        store = self.store
        with self.lock:
            if self._queue is None:
                self._queue = Queue(store, self.max_jobs, self.retries,
                                    str(Path(self.workspace).resolve()) if self.workspace else None)
            return self._queue

    def start(self) -> None:
        """At server start: pick up the jobs a previous server left (only where there is a platform already)."""
        if self.exists:
            self.queue.wake()

    def close(self) -> None:
        if self._queue is not None:
            self._queue.stop()

    @staticmethod
    def tenant(request) -> tuple[str, bool]:
        """(owner, admin) of a request: the API key's name; without keys, one tenant that may do anything."""
        key = getattr(request.state, "key", None)
        return ("default", True) if key is None else (key.name, key.admin)

    # ---- fine-tuned models ------------------------------------------------------------------------------------
    def lookup(self, name: str) -> str | None:
        """The folder of a fine-tuned model or checkpoint by its ft: name (for the pool)."""
        if not name.startswith("ft:") or not self.exists:
            return None
        found = self.store.model_path(name)
        return found[0] if found else None

    def visible(self, name: str, owner: str, admin: bool) -> bool:
        """Whether this tenant may use the model `name`: any served model, and its own fine-tuned ones."""
        if not name.startswith("ft:") or not self.exists:
            return True
        found = self.store.model_path(name)
        return found is None or admin or found[1] == owner

    def delete_model(self, name: str, owner: str, admin: bool) -> bool:
        """Delete a fine-tuned model or checkpoint of this tenant: unloaded, its weights removed, its name no
        longer served. False when there is no such model this tenant may see."""
        import shutil

        found = self.store.model_path(name) if self.exists else None
        if found is None or not (admin or found[1] == owner):
            return False
        self.store.db.execute("INSERT OR IGNORE INTO deleted VALUES (?, ?)", (name, int(time.time())))
        while not self.pool.unload(name):   # requests still being served finish first
            time.sleep(0.1)
        shutil.rmtree(found[0], ignore_errors=True)
        return True

    def counts(self) -> dict:
        """Jobs by status, for /metrics (nothing before the first upload)."""
        if not self.exists:
            return {}
        rows = self.store.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {(("status", s),): n for s, n in rows}

    def models(self, owner: str, admin: bool) -> list[str]:
        if not self.exists:
            return []
        return self.store.models(None if admin else owner)

    def base_of(self, name: str, owner: str, admin: bool) -> str:
        """The reference a job on the served model `name` trains from (a folder for local models)."""
        from ..models.build import arch_of
        from . import protocol as P

        try:
            if not self.visible(name, owner, admin):
                raise KeyError(name)   # another tenant's model reads as if it did not exist
            ref = self.pool.ref(name)
            config = ref.config() if ref.local else None
        except KeyError:
            raise P.APIError(404, f"The model '{name}' does not exist; this server serves: "
                                  f"{', '.join(self.pool.names()) or 'nothing'}", "model", "model_not_found") from None
        except FmkitError as e:
            raise P.invalid(f"model {name} cannot be fine-tuned: {e}", "model") from None
        if config is None:
            raise P.invalid(f"model {name} is a hosted model; only local models can be fine-tuned here", "model")
        if arch_of(config) != "decoder":
            raise P.invalid(f"model {name} is not a causal language model (decoder); it cannot be fine-tuned for "
                            "chat", "model")
        return str(ref.path.resolve()) if ref.path is not None else ref.spec
