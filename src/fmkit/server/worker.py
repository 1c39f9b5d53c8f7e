"""One fine-tuning job in its own process: `python -m fmkit.server.worker PLATFORM_DIR JOB_ID [WORKSPACE]`.

It trains through the adaptation verbs (finetune for supervised jobs, dpo for DPO), so the one loop's checkpoints
and exact resume apply: a job started again continues from its last checkpoint. Progress goes to the job's events
(a metrics event per logged step), each checkpoint is exported as a model that can be served by its own name, and
the finished model is named `ft:BASE:SUFFIX:ID`. SIGTERM (the server stopping or pausing the job, or dying: the
worker asks the kernel for that signal when its parent goes) saves a checkpoint first.
"""
from __future__ import annotations

import csv
import io
import json
import signal
import sys
import time
import traceback
from pathlib import Path

from ..errors import FmkitError
from .store import Store, new_id

LR = {("supervised", True): 2e-4, ("supervised", False): 3e-5, ("dpo", True): 5e-5, ("dpo", False): 5e-6}


def model_name(job: dict) -> str:
    base = job["model"].split(":")[1] if job["model"].startswith("ft:") else job["model"]
    return f"ft:{base}:{job['suffix'] or ''}:{job['id'][-8:]}"


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the server process goes, so no worker trains on for a server that is gone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _interrupt(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # once: the checkpoint that follows must not be cut short
    raise KeyboardInterrupt


class Reporter:
    """The loop's callbacks for one job: metrics events, the estimated finish, exported checkpoints."""

    def __init__(self, store: Store, job: dict, base: str, total: int):
        self.store, self.job, self.base, self.total = store, job, base, total
        self.started, self.first = time.time(), None
        self.tokens = 0

    def on_log(self, r: dict) -> None:
        step = r["step"]
        if "loss" not in r:   # the validation before the first step
            return
        self.first = self.first if self.first is not None else step - 1
        self.tokens = int(r.get("tokens_seen", self.tokens))
        data = {"step": step, "train_loss": r["loss"], "total_steps": self.total,
                "train_mean_token_accuracy": r.get("accuracy"), "valid_loss": r.get("val_loss"),
                "valid_mean_token_accuracy": r.get("val_accuracy")}
        text = f"Step {step}/{self.total}: training loss={r['loss']:.4f}" + (
            f", validation loss={r['val_loss']:.4f}" if "val_loss" in r else "")
        self.store.event(self.job["id"], text, type_="metrics", data=data)
        rate = (time.time() - self.started) / max(1, step - self.first)
        self.store.update("jobs", self.job["id"], estimated_finish=int(time.time() + rate * (self.total - step)))

    def on_checkpoint(self, step: int, model, r: dict) -> None:
        from ..workspace import write_manifest

        folder = self.store.jobs_dir / self.job["id"] / "exported" / f"step-{step:06d}"
        model.save_pretrained(folder, safe_serialization=True)
        adapter = (folder / "adapter_config.json").is_file()
        if not adapter:
            from ..models.reference import resolve

            resolve(self.base).tokenizer().save_pretrained(folder)
        write_manifest(folder, {"kind": "adapter" if adapter else "model", "parent_model": self.base,
                                "job": self.job["id"], "step": step})
        metrics = {"step": step, "train_loss": r.get("loss"), "train_mean_token_accuracy": r.get("accuracy"),
                   "valid_loss": r.get("val_loss"), "valid_mean_token_accuracy": r.get("val_accuracy"),
                   "full_valid_loss": r.get("val_loss"), "full_valid_mean_token_accuracy": r.get("val_accuracy")}
        name = f"{model_name(self.job)}:ckpt-step-{step}"
        if self.store.db.execute("SELECT 1 FROM checkpoints WHERE model = ?", (name,)).fetchone() is None:
            self.store.insert("checkpoints", id=new_id("ftckpt"), job=self.job["id"], created_at=int(time.time()),
                              step=step, metrics=metrics, model=name, path=str(folder))
        self.store.event(self.job["id"], f"Checkpoint created at step {step}: {name}")


def results_csv(store: Store, job_id: str) -> bytes:
    """step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy for every logged step."""
    rows = store.db.execute("SELECT data FROM events WHERE job = ? AND type = 'metrics' ORDER BY n",
                            (job_id,)).fetchall()
    by_step = {}
    for (data,) in rows:   # a step logged twice (before and after a restart) keeps its last figures
        d = json.loads(data)
        by_step[d["step"]] = d
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"])
    for step in sorted(by_step):
        d = by_step[step]
        w.writerow([step] + ["" if d.get(k) is None else f"{d[k]:.6g}" for k in
                             ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")])
    return out.getvalue().encode()


def run(store: Store, job: dict, workspace: str | None) -> None:
    from ..adapt.dpo import dpo
    from ..adapt.finetune import finetune, merge
    from ..train.loop import TrainingInterrupted
    from .files import add_file
    from .jobqueue import last_step

    job_id, kind, plan = job["id"], job["method"]["type"], job["plan"]
    folder = store.jobs_dir / job_id
    out, lora = folder / "model", not job["full"]
    step = last_step(store, job_id)
    store.event(job_id, f"Fine-tuning job resumed from step {step}" if step else "Fine-tuning job started")
    base = job["base"]
    if (Path(base) / "adapter_config.json").is_file():   # a fine-tuned adapter: train on it merged into its base
        merged = folder / "base"
        if not (merged / "config.json").is_file():
            merge(base, merged, workspace=workspace)
        base = str(merged)
    hp = plan["hyperparameters"]
    reporter = Reporter(store, job, base, plan["steps"])
    data = store.get("files", job["training_file"])["path"]
    val = store.get("files", job["validation_file"])["path"] if job["validation_file"] else None
    common = dict(out=out, lora=lora, steps=plan["steps"], lr=LR[kind, lora] * hp["learning_rate_multiplier"],
                  batch_size=hp["batch_size"], seed=job["seed"], resume=step > 0, workspace=workspace,
                  on_log=reporter.on_log, on_checkpoint=reporter.on_checkpoint,
                  save_every=plan["steps_per_epoch"], log_every=max(1, plan["steps"] // 100))
    try:
        if kind == "dpo":
            if val:
                store.event(job_id, "DPO jobs do not use a validation file; it is ignored", "warn")
            dpo(base, data, beta=hp["beta"], **common)
        else:
            finetune(base, data, val_data=val, eval_every=plan["steps_per_epoch"], **common)
    except (KeyboardInterrupt, TrainingInterrupted):
        step, now = last_step(store, job_id), store.get("jobs", job_id)
        if now["want"] == "pause":
            if store.update("jobs", job_id, ("running",), status="paused", estimated_finish=None):
                store.event(job_id, f"Fine-tuning job paused at step {step}")
        elif store.update("jobs", job_id, ("running",), status="queued", estimated_finish=None):
            store.event(job_id, f"The worker was stopped at step {step}; the job continues from there", "warn")
        return
    from ..workspace import read_manifest

    counts = read_manifest(out).get("data_counts") or {}
    if counts:   # examples cut or left out to fit the context: said, not silent
        store.event(job_id, "Examples fitted to the model's context: " + ", ".join(
            f"{n} {what}" for what, n in counts.items()), "warn")
    name = model_name(job)
    results = add_file(store, job["owner"], f"{job_id}-results.csv", "fine-tune-results",
                       results_csv(store, job_id))
    if store.update("jobs", job_id, ("running",), status="succeeded", fine_tuned_model=name,
                    finished_at=int(time.time()), estimated_finish=None, trained_tokens=reporter.tokens,
                    result_files=[results]):
        store.event(job_id, f"New fine-tuned model created: {name}")
        store.event(job_id, "The job has successfully completed")


def main(argv: list[str]) -> int:
    _die_with_parent()
    signal.signal(signal.SIGTERM, _interrupt)
    root, job_id = argv[0], argv[1]
    workspace = argv[2] if len(argv) > 2 and argv[2] else None
    store = Store(root)
    job = store.get("jobs", job_id)
    if job is None or job["status"] != "running":
        return 0
    try:
        run(store, job, workspace)
    except Exception as e:
        traceback.print_exc()
        user = isinstance(e, FmkitError)
        message = str(e) if user else f"{type(e).__name__}: {e}"
        if store.update("jobs", job_id, ("running",), status="failed", finished_at=int(time.time()),
                        estimated_finish=None,
                        error={"code": "training_failed" if user else "server_error", "message": message,
                               "param": None}):
            store.event(job_id, f"Fine-tuning job failed: {message}", "error")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
