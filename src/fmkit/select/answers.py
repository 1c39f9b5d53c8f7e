"""Asking candidates: one answer per candidate and suite row, kept in an append-only store so that an interrupted
compare re-asks nothing it already has.

Each answer carries its latency (one request at a time per worker, so the figure is what a caller would wait),
tokens (as the API reports them; counted with the tokenizer for local models) and cost. Hosted candidates run
`concurrency` workers, each with its own client, so usage is counted per request; retries, the response cache
and the price table are the providers' own.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import FmkitError
from .candidates import Candidate, request, uses_chat


class Store:
    """{key: value} kept as JSONL lines appended (and flushed) one at a time; a torn last line is skipped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict = {}
        self._lock = threading.Lock()
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            for line in text.splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.data[row["key"]] = row["value"]
            if text and not text.endswith("\n"):   # torn by an interrupted write: keep the whole lines only
                self.path.write_text("".join(json.dumps({"key": k, "value": v}, default=str) + "\n"
                                             for k, v in self.data.items()), encoding="utf-8")

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        with self._lock:
            self.data[key] = value
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "value": value}, default=str) + "\n")


def _local_tokens(model, req) -> int:
    text = req.prompt if isinstance(req.prompt, str) else "\n".join(m["content"] for m in req.prompt)
    return len(model.enc(text))


def ask_one(model, c: Candidate, chat: bool, req) -> dict:
    """One request, timed, with its token usage and cost; a request the backend gives up on is an answer with
    an error (counted as a failure), not the end of the comparison."""
    u = model.usage
    before = (u.prompt_tokens, u.completion_tokens, u.cached)
    t = time.perf_counter()
    try:
        out, error = (model.chat if chat else model.generate)([req])[0], ""
    except FmkitError as e:
        out, error = None, str(e)
    ms = (time.perf_counter() - t) * 1000
    if hasattr(model, "enc"):    # local: no API reports tokens
        pt, ct, cached = _local_tokens(model, req), len(model.enc(out or "")), False
    else:
        pt, ct, cached = u.prompt_tokens - before[0], u.completion_tokens - before[1], u.cached > before[2]
    price = tuple(c.price) if c.price is not None else tuple(getattr(model, "price", (0.0, 0.0)))
    answer = {"output": out, "error": error, "latency_ms": round(ms, 3), "prompt_tokens": pt,
              "completion_tokens": ct, "cost": pt / 1e6 * price[0] + ct / 1e6 * price[1], "cached": cached}
    if cached:   # answered from the response cache: nothing measured, nothing billed this time
        answer.update(latency_ms=None, prompt_tokens=None, completion_tokens=None, cost=0.0)
    return answer


def ask_rows(c: Candidate, opener, suite, store: Store, advance) -> dict:
    """{item id: answer} for every row of a rows suite, asking only what the store does not hold yet."""
    fp = c.fingerprint()
    todo, answers = [], {}
    models: queue.Queue = queue.Queue()
    for item in suite.items:
        key = Store.key(fp, suite.name, item.id, item.input, item.vars)
        got = store.get(key)
        if got is not None:
            answers[item.id] = got
            advance()
        else:
            todo.append((item, key))
    if not todo:
        return answers
    first = opener(1)
    remote = not hasattr(first, "enc")
    workers = max(1, c.concurrency) if remote else 1
    models.put(first)
    for _ in range(min(workers, len(todo)) - 1):
        models.put(opener(1))
    chat = uses_chat(c, first)
    if not remote:   # the first request of a local model also builds its decoder: not part of any latency
        item = todo[0][0]
        (first.chat if chat else first.generate)([request(c, chat, item.input, item.vars, "")])

    def work(job):
        item, key = job
        m = models.get()
        try:
            req = request(c, chat, item.input, item.vars, f"{suite.source}:{item.line}")
            answer = ask_one(m, c, chat, req)
        finally:
            models.put(m)
        store.put(key, answer)
        advance()
        return item.id, answer

    if workers == 1:
        answers.update(work(j) for j in todo)
    else:
        with ThreadPoolExecutor(workers) as pool:
            answers.update(pool.map(work, todo))
    return answers


def run_task(c: Candidate, opener, suite, folder: Path, workspace) -> list[dict]:
    """An eval-task suite through the eval stage (`fmkit.evals.runner.evaluate`), reusing a finished run of the
    same candidate and task; one answer per item, read from its samples.jsonl."""
    from ..evals.runner import evaluate
    from ..evals.tasks import load_items

    # the task file and its items: an edited dataset is a different suite
    key = Store.key(c.fingerprint(), Path(suite.source).read_text() if Path(suite.source).is_file()
                    else suite.source, load_items(suite.task), suite.task.limit)
    stamp = folder / "compare-key.json"
    if not ((folder / "samples.jsonl").is_file() and stamp.is_file()
            and json.loads(stamp.read_text()).get("key") == key):
        model = opener(max(1, c.concurrency))
        evaluate(model, [suite.source], out=folder, workspace=workspace, contamination=False)
        stamp.write_text(json.dumps({"key": key}))
    doc = json.loads((folder / "results.json").read_text())
    res = doc["results"][suite.task.task]
    usage = doc.get("usage", {})
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
    n = max(1, len(rows))
    # the eval stage reports time and usage per task, not per item: each item gets its share
    price = tuple(c.price) if c.price is not None else None
    pt, ct = usage.get("prompt_tokens") or None, usage.get("completion_tokens") or None
    cost = usage.get("cost", 0.0) if price is None else ((pt or 0) / 1e6 * price[0] + (ct or 0) / 1e6 * price[1])
    out = []
    for row in rows:
        scores = {k: float(v) for k, v in row.get("scores", {}).items()
                  if isinstance(v, (int, float)) and k != "unparsable"}
        out.append({"id": str(row["id"]), "input": row.get("prompt", ""), "output": _task_output(row),
                    "scores": scores, "latency_ms": round(res["seconds_per_item"] * 1000, 3),
                    "latency_kind": "mean per item", "prompt_tokens": pt / n if pt else None,
                    "completion_tokens": ct / n if ct else None, "cost": cost / n, "error": "",
                    "failure": _task_failure(row), "target": row.get("target")})
    return out


def _task_output(row: dict) -> str:
    if "output" in row:
        return str(row["output"])
    if "completions" in row:
        return str(row["completions"][0]) if row["completions"] else ""
    if "loglikelihoods" in row and row.get("choices"):
        lls = row["loglikelihoods"]
        return row["choices"][max(range(len(lls)), key=lls.__getitem__)]
    return ""


def _task_failure(row: dict) -> str | None:
    if row.get("unparsable") or row.get("scores", {}).get("unparsable"):
        return "unparsable"
    statuses = [r.get("status") for r in row.get("results", [])]
    if "timeout" in statuses:
        return "timeout"
    if row.get("output") is not None and not str(row["output"]).strip():
        return "empty"
    from .assertions import REFUSAL

    return "refusal" if REFUSAL.search(str(row.get("output") or "")) else None
