"""Fine-tuning data: the OpenAI chat fine-tuning JSONL (`{"messages": [...]}`) and prompt/completion JSONL.

`validate_jsonl` checks every line up front and reports problems as `file:line: what is wrong`; it is the one
validator the training verbs and the server's fine-tuning jobs share. Examples longer than the context are
truncated or dropped (`on_long`), and each is counted.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FmkitError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    line: int
    messages: list                   # [{"role", "content", "weight"?}]


@dataclass
class Report:
    path: str
    examples: int = 0
    errors: list = field(default_factory=list)      # "file:line: message"
    problems: list = field(default_factory=list)    # (line, message): the same, for callers that name the file
    counts: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.errors


def _check_messages(msgs, where: str) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with role and content"
        role = m.get("role")
        if role not in ROLES:
            return f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}"
        content = m.get("content")
        if not isinstance(content, str):
            return f"messages[{i}] ({role}) has no text content" if content is None else \
                f"messages[{i}].content must be a string, got {type(content).__name__}"
        if role == "assistant" and not content.strip() and not m.get("tool_calls"):
            return f"messages[{i}] (assistant) is empty"
        if "weight" in m and m["weight"] not in (0, 1):
            return f"messages[{i}].weight must be 0 or 1"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message: there is nothing to learn from this example"
    return None


def read_examples(path: str | Path, max_errors: int = 20) -> tuple[list[Example], Report]:
    """Parse and check a chat or prompt/completion JSONL file; problems are collected, not raised."""
    p = Path(path)
    report = Report(str(p))
    if not p.is_file():
        raise FmkitError(f"training data {p} not found")
    examples = []

    def problem(lineno: int, message: str) -> None:
        report.problems.append((lineno, message))
        report.errors.append(f"{p}:{lineno}: {message}")

    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            if not raw.strip():
                report.counts["blank lines"] += 1
                continue
            try:
                row = json.loads(raw)
            except UnicodeDecodeError:
                problem(lineno, "not UTF-8")
                continue
            except json.JSONDecodeError as e:
                problem(lineno, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                problem(lineno, "each line must be a JSON object")
                continue
            if "messages" in row:
                msgs = row["messages"]
            elif "prompt" in row or "completion" in row:
                if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                    problem(lineno, "prompt and completion must both be strings")
                    continue
                msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
            else:
                problem(lineno, "expected a 'messages' list or 'prompt' and 'completion' fields")
                continue
            bad = _check_messages(msgs, where)
            if bad:
                problem(lineno, bad)
                continue
            examples.append(Example(lineno, msgs))
            report.examples += 1
    if len(report.errors) > max_errors:
        report.errors = report.errors[:max_errors] + [f"... and {len(report.errors) - max_errors} more"]
    return examples, report


class BadLine(ValueError):
    """What is wrong with one JSONL line; `read_jsonl` adds the file and line number."""


def scan_jsonl(path: Path, parse) -> tuple[list, list[tuple[int, str]]]:
    """`parse(row)` of every JSON line of PATH (blank lines skipped), and the (line, problem) of each line that
    `parse` rejects by raising BadLine or that is not JSON."""
    items, problems = [], []
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            items.append(parse(json.loads(raw)))
        except json.JSONDecodeError as e:
            problems.append((lineno, f"invalid JSON ({e.msg})"))
        except BadLine as e:
            problems.append((lineno, str(e)))
    return items, problems


def read_jsonl(path: str | Path, parse, missing: str, empty: str) -> list:
    """`parse(row)` of every JSON line of PATH (blank lines skipped); `parse` raises BadLine to reject a line. All
    problems are reported together, each as `file:line: what is wrong`, in one FmkitError. `missing` names the file
    when it does not exist ("preference data"), `empty` what a file without any line holds ("examples")."""
    p = Path(path)
    if not p.is_file():
        raise FmkitError(f"{missing} {p} not found")
    items, problems = scan_jsonl(p, parse)
    errors = [f"{p}:{n}: {msg}" for n, msg in problems]
    if errors:
        raise FmkitError(f"{len(errors)} problem(s) in {p}:\n  " + "\n  ".join(errors[:20]))
    if not items:
        raise FmkitError(f"{p} holds no {empty}")
    return items


def validate_jsonl(path: str | Path) -> list[Example]:
    """Examples of a valid file; otherwise one FmkitError listing the first problems with their line numbers."""
    examples, report = read_examples(path)
    if report.errors:
        raise FmkitError(f"{len(report.errors)} problem(s) in {path}:\n  " + "\n  ".join(report.errors))
    if not examples:
        raise FmkitError(f"{path} holds no training examples")
    return examples
