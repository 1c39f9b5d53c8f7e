"""The rewards `fmkit rl` takes. Each becomes `fn(prompts, answers, fields) -> list[float]`, NaN where an answer
could not be scored (rl counts those and gives them 0):

- a rule, computed here on the answer's text, which it never runs: `json` (1 when the answer is a JSON object or
  array, else 0), `length:N` (1 - |characters - N| / N, at least 0), `contains:TEXT` (1 when TEXT is in it);
- a reward model folder written by `fmkit reward` (or its name in the workspace): its score;
- a Python function, `FILE.py` (function `reward`), `FILE.py:NAME` or `MODULE:NAME`, called as
  `NAME(prompt, answer, **fields) -> float` with the prompt as the data line gives it and the line's other fields.
  It runs in the sandbox (fmkit.sandbox), one process per answer under its limits, because a reward function
  typically runs what the model wrote (unit tests of generated code); an answer that crashes, hangs or exits
  before the function returns gets NaN. The source file is run as the sandboxed program, so a module must be a
  single file whose own imports resolve there (the standard library, installed packages); locating a dotted
  MODULE imports its parent packages, never the module itself.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Callable

from ..errors import FmkitError
from ..workspace import locate

RewardFn = Callable[[list, list[str], list[dict]], list[float]]
FORMS = "json, length:N, contains:TEXT, a reward model folder, FILE.py[:NAME] or MODULE:NAME"
MARK = "fmkit-reward "   # the sandboxed program's last line on stderr (whose end the sandbox keeps) holds the score


def is_json(answer: str) -> float:
    try:
        return float(isinstance(json.loads(answer.strip()), (dict, list)))
    except ValueError:
        return 0.0


def rule(spec: str) -> Callable[[str], float] | None:
    """The built-in rule `spec` names, as answer -> reward; None when it names none."""
    kind, _, arg = spec.partition(":")
    if spec == "json":
        return is_json
    if kind == "contains" and arg:
        return lambda answer: float(arg in answer)
    if kind == "length":
        if not arg.isdigit() or int(arg) < 1:
            raise FmkitError(f"--reward {spec}: length:N takes a whole number of characters N >= 1")
        n = int(arg)
        return lambda answer: max(0.0, 1.0 - abs(len(answer) - n) / n)
    return None


def _source(spec: str) -> tuple[str, str, str]:
    """(source text, function name, where) of FILE.py[:NAME] or MODULE:NAME, without running any of it."""
    target, _, name = spec.rpartition(":") if not spec.endswith(".py") else (spec, "", "reward")
    name = name or "reward"
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FmkitError(f"--reward {spec}: no such file {path}")
    else:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise FmkitError(f"--reward {spec}: no Python module {target} (give FILE.py:NAME for a file)")
        path = Path(found.origin)
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise FmkitError(f"--reward {spec}: {path}:{e.lineno}: {e.msg}") from None
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if name not in defined:
        raise FmkitError(f"--reward {spec}: {path} defines no {name} at top level")
    return source, name, str(path)


def sandboxed(spec: str, timeout: float = 5.0, workers: int = 0) -> RewardFn:
    """A Python reward function run in the sandbox, one process per answer."""
    from ..sandbox import Limits, run_many

    source, name, _ = _source(spec)
    limits = Limits(timeout=timeout, cpu_seconds=max(1, math.ceil(timeout)))
    workers = workers or min(8, os.cpu_count() or 2)

    def program(prompt, answer: str, fields: dict) -> str:
        item = json.dumps({"prompt": prompt, "answer": answer, "fields": fields})
        return (f"{source}\n\nimport json as _fmkit_json, sys as _fmkit_sys\n"
                f"_fmkit_item = _fmkit_json.loads({item!r})\n"
                f"_fmkit_value = float({name}(_fmkit_item['prompt'], _fmkit_item['answer'], "
                f"**_fmkit_item['fields']))\n"
                f"_fmkit_sys.stderr.write('\\n{MARK}' + repr(_fmkit_value) + '\\n')\n")

    def fn(prompts: list, answers: list[str], fields: list[dict]) -> list[float]:
        results = run_many([program(p, a, f) for p, a, f in zip(prompts, answers, fields)], limits, workers)
        out = []
        for r in results:
            last = r.stderr.rstrip("\n").rsplit("\n", 1)[-1]
            ok = r.status == "passed" and last.startswith(MARK)
            out.append(float(last[len(MARK):]) if ok else math.nan)
        return out
    return fn


def resolve_reward(spec: str, workspace: str | Path | None = None, timeout: float = 5.0) -> RewardFn:
    """The reward `spec` names, as `fn(prompts, answers, fields) -> list[float]` (see the module's list)."""
    spec = str(spec)
    check = rule(spec)
    if check is not None:
        return lambda prompts, answers, fields: [check(a) for a in answers]
    if spec.endswith(".py") or ".py:" in spec:
        return sandboxed(spec, timeout)
    folder = locate(spec, "models", workspace)
    if folder.is_dir():
        from .reward import RewardModel

        model = RewardModel(folder)
        return lambda prompts, answers, fields: model(prompts, answers)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        return sandboxed(spec, timeout)
    raise FmkitError(f"--reward {spec} is none of: {FORMS}")
