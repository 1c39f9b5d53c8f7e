"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause and resume jobs; their events and checkpoints.

The routes only read and write rows; the queue (jobqueue.py) validates files, runs each job in a worker process
(worker.py) through the one training loop, and notices workers that die. The objects are OpenAI's shapes, so the
`openai` SDK's `client.fine_tuning.jobs.*` work unchanged.
"""
from __future__ import annotations

import asyncio
import re
import secrets
import time

from fastapi import Request

from . import protocol as P
from .files import cursor_page
from .jobqueue import UNFINISHED
from .store import new_id

JOB_FIELDS = {"model", "training_file", "validation_file", "suffix", "seed", "metadata", "method", "hyperparameters",
              "integrations", "lora"}
LIMITS = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 1e-6, 100.0),
          "beta": (float, 1e-6, 10.0)}
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def job_object(row: dict) -> dict:
    method = row["method"]
    return {"id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"], "error": row["error"],
            "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
            "hyperparameters": method[method["type"]]["hyperparameters"], "model": row["model"],
            "organization_id": f"org-{row['owner']}", "result_files": row["result_files"], "seed": row["seed"],
            "status": row["status"], "trained_tokens": row["trained_tokens"], "training_file": row["training_file"],
            "validation_file": row["validation_file"], "estimated_finish": row["estimated_finish"],
            "integrations": [], "metadata": row["metadata"], "method": method, "user_provided_suffix": row["suffix"],
            "lora": not row["full"]}


def hyperparameters(given, param: str, dpo: bool) -> dict:
    """Checked hyperparameters: each "auto" or a number in its range (beta for DPO only)."""
    if given is None or given == "auto":
        given = {}
    if not isinstance(given, dict):
        raise P.invalid(f"'{param}' must be an object", param)
    allowed = ("n_epochs", "batch_size", "learning_rate_multiplier") + (("beta",) if dpo else ())
    out = {}
    for k, v in given.items():
        if k not in allowed:
            raise P.invalid(f"unknown hyperparameter '{k}'; the hyperparameters are: {', '.join(allowed)}",
                            f"{param}.{k}")
        kind, lo, hi = LIMITS[k]
        ok = v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and
                             (kind is float or float(v).is_integer()) and lo <= v <= hi)
        if not ok:
            raise P.invalid(f"{param}.{k} must be \"auto\" or a{'n integer' if kind is int else ' number'} from "
                            f"{lo:g} to {hi:g}, got {v!r}", f"{param}.{k}")
        out[k] = v if v == "auto" else kind(v)
    return {k: out.get(k, "auto") for k in allowed}


def method_of(body: dict) -> dict:
    """OpenAI's `method` ({type, supervised|dpo: {hyperparameters}}), from it or the legacy `hyperparameters`."""
    method, legacy = body.get("method"), body.get("hyperparameters")
    if method is None:
        return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters(legacy, "hyperparameters",
                                                                                        False)}}
    if not isinstance(method, dict) or method.get("type") not in ("supervised", "dpo", "reinforcement"):
        raise P.invalid("method.type must be supervised or dpo", "method.type")
    kind = method["type"]
    if kind == "reinforcement":
        raise P.invalid("reinforcement fine-tuning is not supported; use supervised or dpo", "method.type",
                        "unsupported_value")
    if legacy not in (None, {}, "auto"):
        raise P.invalid("give hyperparameters in method, or the legacy top-level field, not both", "hyperparameters")
    inner = method.get(kind) or {}
    if not isinstance(inner, dict):
        raise P.invalid(f"method.{kind} must be an object", f"method.{kind}")
    return {"type": kind, kind: {"hyperparameters": hyperparameters(inner.get("hyperparameters"),
                                                                    f"method.{kind}.hyperparameters",
                                                                    kind == "dpo")}}


def add_routes(app, platform) -> None:
    def job_of(request: Request, job_id: str) -> dict:
        owner, admin = platform.tenant(request)
        row = platform.store.get("jobs", job_id, None if admin else owner)
        if row is None:
            raise P.APIError(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "job_not_found")
        return row

    def training_file(owner: str, admin: bool, file_id, param: str) -> dict:
        if not isinstance(file_id, str) or not file_id:
            raise P.invalid(f"'{param}' must be a file id", param)
        row = platform.store.get("files", file_id, None if admin else owner)
        if row is None:
            raise P.APIError(404, f"No such File object: {file_id}", param, "file_not_found")
        if row["purpose"] != "fine-tune":
            raise P.invalid(f"{file_id} was uploaded with purpose '{row['purpose']}'; fine-tuning files need "
                            "purpose 'fine-tune'", param)
        return row

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        owner, admin = platform.tenant(request)
        body = await platform.body_of(request)
        P.unknown_fields(body, JOB_FIELDS)
        name = P.get(body, "model", (str,), P.REQUIRED)
        method = method_of(body)
        base = await asyncio.to_thread(platform.base_of, name, owner, admin)
        training_file(owner, admin, body.get("training_file"), "training_file")
        if body.get("validation_file") is not None:
            training_file(owner, admin, body["validation_file"], "validation_file")
        suffix = P.get(body, "suffix", (str,), None)
        if suffix is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", suffix):
            raise P.invalid("suffix must be 1 to 64 letters, digits, - or _", "suffix")
        seed = P.get(body, "seed", (int,), None, 0, 2 ** 31 - 1)
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items())):
            raise P.invalid("metadata must be at most 16 string keys (64 characters) with string values (512)",
                            "metadata")
        if body.get("integrations"):
            raise P.invalid("integrations are not supported by this server", "integrations", "unsupported_value")
        lora = P.get(body, "lora", (bool,), True)
        job_id = new_id("ftjob")
        row = platform.store.insert("jobs", id=job_id, owner=owner, created_at=int(time.time()), model=name, base=base,
                             training_file=body["training_file"], validation_file=body.get("validation_file"),
                             method=method, suffix=suffix,
                             seed=seed if seed is not None else secrets.randbelow(2 ** 31), metadata=metadata,
                             full=int(not lora), status="validating_files", result_files=[])
        platform.store.event(job_id, f"Created fine-tuning job: {job_id}")
        platform.queue.wake()
        return job_object(row)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
        owner, admin = platform.tenant(request)
        P.within(limit, "limit", 1, 100)
        where = {}
        for k, v in request.query_params.multi_items():   # the SDK sends metadata[KEY]=VALUE
            if k.startswith("metadata[") and k.endswith("]"):
                key = k[9:-1]
                if not _KEY.match(key):
                    raise P.invalid(f"metadata key '{key}' may hold letters, digits, _ . - only", "metadata")
                where[f"json_extract(metadata, '$.\"{key}\"')"] = v
        rows, more = platform.store.page("jobs", None if admin else owner, after, limit, where=where)
        return {"object": "list", "data": [job_object(r) for r in rows], "has_more": more}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(request: Request, job_id: str):
        return job_object(job_of(request, job_id))

    async def move(request: Request, job_id: str, action: str, allowed: tuple, which: str, done: str) -> dict:
        """Ask the queue to `action` (cancel, pause, resume) the job if its status is one of `allowed`; the job as
        it is after."""
        row = job_of(request, job_id)
        if row["status"] not in allowed:
            raise P.invalid(f"job {job_id} is {row['status']}; only {which} jobs can be {done}",
                            "fine_tuning_job_id", "invalid_job_state")
        await asyncio.to_thread(getattr(platform.queue, action), job_id)
        return job_object(platform.store.get("jobs", job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(request: Request, job_id: str):
        return await move(request, job_id, "cancel", UNFINISHED, "unfinished", "cancelled")

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(request: Request, job_id: str):
        return await move(request, job_id, "pause", ("validating_files", "queued", "running"),
                          "queued or running", "paused")

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume_job(request: Request, job_id: str):
        return await move(request, job_id, "resume", ("paused",), "paused", "resumed")

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(request: Request, job_id: str, after: str | None = None, limit: int = 20):
        job_of(request, job_id)
        P.within(limit, "limit", 1, 1000)
        rows, more = platform.store.page("events", None, after, limit, where={"job": job_id})
        return {"object": "list", "has_more": more, "data": [
            {"id": r["id"], "object": "fine_tuning.job.event", "created_at": r["created_at"], "level": r["level"],
             "message": r["message"], "data": r["data"], "type": r["type"]} for r in rows]}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10):
        job_of(request, job_id)
        P.within(limit, "limit", 1, 100)
        rows, more = platform.store.page("checkpoints", None, after, limit, where={"job": job_id})
        return cursor_page([{"id": r["id"], "object": "fine_tuning.job.checkpoint", "created_at": r["created_at"],
                             "fine_tuned_model_checkpoint": r["model"], "fine_tuning_job_id": job_id,
                             "metrics": r["metrics"], "step_number": r["step"]} for r in rows], more)
