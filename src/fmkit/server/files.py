"""/v1/files: uploads kept under the workspace and indexed in SQLite, each visible to the key that uploaded it.

Fine-tuning files are checked as they arrive, with the adaptation stage's validators (chat or prompt/completion
JSONL for supervised jobs, preference pairs for DPO): a bad file is refused with every problem as `line N: what is
wrong`, and checked again when a job starts.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse

from . import protocol as P
from .store import new_id

PURPOSES = ("fine-tune", "batch", "assistants", "user_data", "evals", "vision")
ALIASES = {"fine-tuning": "fine-tune", "finetune": "fine-tune"}   # what some client code sends for fine-tune
MAX_LISTED = 20   # problems named in one error message


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
            "expires_at": None}


def cursor_page(data: list[dict], more: bool) -> dict:
    """OpenAI's list envelope for cursor pagination: the next page starts `after` last_id."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def looks_like_pairs(path: Path) -> bool:
    """Whether a JSONL file holds preference pairs (DPO) rather than chat examples, by its first object line."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    row = json.loads(raw)
                except ValueError:
                    return False
                return isinstance(row, dict) and ("preferred_output" in row or "chosen" in row)
    return False


def training_problems(path: Path, kind: str = "auto") -> tuple[int, list[str]]:
    """(examples, problems as `line N: what is wrong`) of a fine-tuning file; kind: supervised, dpo or auto."""
    if kind == "auto":
        kind = "dpo" if looks_like_pairs(path) else "supervised"
    if kind == "dpo":
        from ..adapt.chat_data import scan_jsonl
        from ..adapt.dpo import _pair

        items, problems = scan_jsonl(path, _pair)
        return len(items), [f"line {n}: {msg}" for n, msg in problems]
    from ..adapt.chat_data import read_examples

    examples, report = read_examples(path, max_errors=10 ** 9)
    return len(examples), [f"line {n}: {msg}" for n, msg in report.problems]


def describe(problems: list[str], what: str) -> str:
    listed = "; ".join(problems[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more"
                                                 if len(problems) > MAX_LISTED else "")
    return f"{what} has {len(problems)} problem(s): {listed}"


def add_routes(app, platform, max_file: int) -> None:
    def mine(request: Request, file_id: str) -> dict:
        owner, admin = platform.tenant(request)
        row = platform.store.get("files", file_id, None if admin else owner)
        if row is None:
            raise P.APIError(404, f"No such File object: {file_id}", "id", "file_not_found")
        return row

    @app.post("/v1/files")
    async def create_file(request: Request):
        owner, _ = platform.tenant(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise P.invalid("upload a file as multipart/form-data with the fields 'file' and 'purpose'", "file")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as e:   # a malformed body is the client's to fix
            raise P.invalid(f"the multipart body could not be read ({e})", "file") from None
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise P.invalid("'file' is required: the file's content as a multipart file field", "file")
        if not isinstance(purpose, str) or not purpose:
            raise P.invalid(f"'purpose' is required: one of {', '.join(PURPOSES)}", "purpose")
        purpose = ALIASES.get(purpose, purpose)
        if purpose not in PURPOSES:
            raise P.invalid(f"'{purpose}' is not a valid purpose; use one of {', '.join(PURPOSES)}", "purpose")
        file_id = new_id("file")
        path = platform.store.files_dir / file_id
        size = await asyncio.to_thread(_copy, upload.file, path, max_file)
        await upload.close()
        if size is None:
            raise P.APIError(413, f"the file is over this server's limit of {max_file} bytes", "file",
                             "file_too_large")
        name = Path(upload.filename or "upload").name
        if purpose == "fine-tune":
            if not name.endswith(".jsonl"):
                path.unlink()
                raise P.invalid(f"{name}: fine-tuning files must be JSONL (.jsonl)", "file", "invalid_file_format")
            n, problems = await asyncio.to_thread(training_problems, path)
            if problems or not n:
                path.unlink()
                raise P.invalid(describe(problems, name) if problems else f"{name} holds no training examples",
                                "file", "invalid_file_format")
        row = platform.store.insert("files", id=file_id, owner=owner, filename=name, purpose=purpose, bytes=size,
                                    created_at=int(time.time()), path=str(path))
        return file_object(row)

    @app.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                         order: str = "desc"):
        owner, admin = platform.tenant(request)
        if order not in ("asc", "desc"):
            raise P.invalid(f"order must be asc or desc, got '{order}'", "order")
        P.within(limit, "limit", 1, 10000)
        rows, more = platform.store.page("files", None if admin else owner, after, limit, order == "asc",
                                         {"purpose": ALIASES.get(purpose, purpose)} if purpose else None)
        return cursor_page([file_object(r) for r in rows], more)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(request: Request, file_id: str):
        return file_object(mine(request, file_id))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str):
        row = mine(request, file_id)
        return FileResponse(row["path"], media_type="application/octet-stream", filename=row["filename"])

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str):
        row = mine(request, file_id)
        platform.store.delete("files", file_id)
        Path(row["path"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


def _copy(src, path: Path, limit: int) -> int | None:
    """Copy an upload to `path`; its size, or None (and nothing kept) when it is over `limit` bytes."""
    size = 0
    with open(path, "wb") as out:
        while block := src.read(1 << 20):
            size += len(block)
            if size > limit:
                break
            out.write(block)
    if size > limit:
        path.unlink()
        return None
    return size


def add_file(store, owner: str, filename: str, purpose: str, data: bytes) -> str:
    """Store bytes made on the server (a job's results) as a file of `owner`; returns its id."""
    file_id = new_id("file")
    path = store.files_dir / file_id
    path.write_bytes(data)
    store.insert("files", id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=len(data),
                 created_at=int(time.time()), path=str(path))
    return file_id
