"""Imports run one way (DESIGN.md): the bottom (errors, runtime, config, workspace, ...) under models/ and
providers/, under the stages data -> tokenize -> train -> adapt -> evals, under what sits on top (the CLI, the
verbs that span stages, server/ (fmkit serve), select/, scale/). No module imports one above it, even lazily inside a function,
and there are no import circles; no module is over ~500 lines."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fmkit"
LAYERS = [
    {"errors", "progress", "runtime", "config", "workspace", "plots", "verbs", "sandbox"},
    {"models"},
    {"providers"},
    {"data"},
    {"tokenize"},
    {"train"},
    {"adapt"},
    {"evals"},
    {"cli", "__init__", "__main__", "lifecycle", "conversation", "server", "select", "scale"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported fmkit module, line) for every import in the file, lazy ones included."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("fmkit"):
                out.append((name, node.lineno))
                for alias in node.names:   # `from . import checkpoint` names a module
                    if (SRC.parent / Path(*name.split("."), alias.name)).with_suffix(".py").exists():
                        out.append((f"{name}.{alias.name}", node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("fmkit")]
    return out


def modules() -> dict[str, Path]:
    found = {}
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found[name] = p
    return found


def test_no_module_imports_a_layer_above_it():
    bad = []
    for name, path in modules().items():
        for target, line in imports(path):
            if target != "fmkit" and layer_of(target) > layer_of(name):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles_at_module_level():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        top_level = {n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        graph[name] = {t for t, line in imports(path) if line in top_level and t in mods and t != name}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for m in graph.get(n, ()):
            if not (n.startswith(m + ".") or m == "fmkit"):   # a package's own __init__ is imported first
                visit(m)
        stack.pop()

    for n in graph:
        visit(n)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_is_far_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 550}
    assert not long, long
