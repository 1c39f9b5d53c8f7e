"""Suites: the user's own inputs as JSONL rows, or any fmkit eval task (a task YAML or a built-in name).

One row per line:

    {"id": "q1", "input": "Capital of France?", "reference": "Paris", "assert": [{"contains": "Paris"}],
     "rubric": "Names the capital and nothing else.", "vars": {"lang": "en"}, "meta": {...}}

`input` (text, or chat messages [{role, content}]) is required; the rest is optional. `id` defaults to the line
number; `vars` fill the candidate's prompt template beside `input`; `meta` is carried along untouched. Every bad
row is reported as file:line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FmkitError
from .assertions import Check, parse_check

ROW_FIELDS = ("id", "input", "reference", "assert", "rubric", "vars", "meta")


@dataclass
class Item:
    id: str
    input: object
    line: int
    reference: str | None = None
    checks: list[Check] = field(default_factory=list)
    rubric: str = ""
    vars: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    source: str
    items: list[Item] = field(default_factory=list)   # rows suites
    task: object = None                               # eval-task suites: the loaded fmkit.evals Task

    @property
    def is_task(self) -> bool:
        return self.task is not None

    def metrics(self) -> list[str]:
        """The metrics this suite scores, primary first."""
        if self.is_task:
            return [("pass@1" if m == "pass@k" else m) for m in self.task.metrics]
        out = []
        if any(i.checks or i.reference is not None for i in self.items):
            out.append("pass")
        for kind in dict.fromkeys(c.kind for i in self.items for c in i.checks):
            out.append(kind)
        if any(i.reference is not None for i in self.items):
            out += ["exact_match", "token_f1"]
        if any(i.rubric for i in self.items):
            out.append("rubric")
        return out


def load_suite(spec: str, limit: int = 0) -> Suite:
    """A .jsonl file of rows, else an eval task (YAML file or built-in name) checked by the eval stage."""
    suites = load_suites([spec], limit)
    if len(suites) != 1:
        raise FmkitError(f"{spec} is a suite of {len(suites)} eval tasks; name one of them")
    return suites[0]


def load_suites(specs: list[str], limit: int = 0) -> list[Suite]:
    """Each spec's suite: a .jsonl file of rows, or eval tasks by the eval stage's rules (a task file, a built-in
    name, or a suite file such as `redteam` that lists several tasks, each becoming a suite)."""
    from ..evals.tasks import load_tasks

    out = []
    for spec in specs:
        if Path(spec).suffix == ".jsonl":
            out.append(_rows_suite(Path(spec), limit))
            continue
        for task in load_tasks([spec]):
            if limit:
                task.limit = min(x for x in (limit, task.limit) if x)
            out.append(Suite(task.task, task.source, task=task))
    return out


def _rows_suite(p: Path, limit: int) -> Suite:
    if not p.is_file():
        raise FmkitError(f"suite file {p} not found")
    items, problems, seen = [], [], {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            items.append(_item(line, n, where, seen))
        except FmkitError as e:
            problems.append(str(e))
        if limit and len(items) >= limit:
            break
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise FmkitError(f"{p}: {len(problems)} bad row(s):\n  {shown}")
    if not items:
        raise FmkitError(f"{p}: the suite has no rows")
    return Suite(p.stem, str(p), items)


def _item(line: str, n: int, where: str, seen: dict) -> Item:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise FmkitError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise FmkitError(f"{where}: each row must be a JSON object")
    unknown = [k for k in row if k not in ROW_FIELDS]
    if unknown:
        raise FmkitError(f"{where}: unknown field '{unknown[0]}' (fields: {', '.join(ROW_FIELDS)}; put other data "
                         "under meta)")
    text = row.get("input")
    messages = isinstance(text, list) and text and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in text)
    if not (isinstance(text, str) and text.strip()) and not messages:
        raise FmkitError(f"{where}: 'input' must be non-empty text or a list of {{role, content}} messages")
    id_ = str(row.get("id", n))
    if id_ in seen:
        raise FmkitError(f"{where}: id '{id_}' is already used on line {seen[id_]}")
    seen[id_] = n
    ref = row.get("reference")
    if ref is not None and not isinstance(ref, (str, int, float)):
        raise FmkitError(f"{where}: 'reference' must be text, got {type(ref).__name__}")
    checks = row.get("assert", [])
    if not isinstance(checks, list):
        raise FmkitError(f"{where}: 'assert' must be a list of assertions")
    rubric = row.get("rubric", "")
    if not isinstance(rubric, str):
        raise FmkitError(f"{where}: 'rubric' must be text")
    variables = row.get("vars", {})
    if not isinstance(variables, dict):
        raise FmkitError(f"{where}: 'vars' must be a mapping")
    return Item(id_, text, n, None if ref is None else str(ref), [parse_check(c, where) for c in checks], rubric,
                variables, row)
