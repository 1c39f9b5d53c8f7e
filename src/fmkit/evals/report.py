"""`fmkit eval report RUN`: the results as a table, and report.html with a plot of every metric and its error."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from rich.table import Table

from ..errors import FmkitError
from ..progress import report as console
from ..workspace import locate


def _load(run: str | Path) -> dict:
    p = Path(run) / "results.json"
    if not p.is_file():
        raise FmkitError(f"{run} is not an eval run (no results.json)")
    return json.loads(p.read_text())


def _rows(doc: dict) -> list[list[str]]:
    rows = []
    for task, res in doc["results"].items():
        cont = res.get("contamination", {})
        for name, m in res["metrics"].items():
            clean = cont.get("clean", {}).get(name, {}).get("value") if cont else None
            dirty = cont.get("contaminated", {}).get(name, {}).get("value") if cont else None
            rows.append([task, name, f"{m['value']:.4f}", f"{m['stderr']:.4f}", str(res["items"]),
                         "" if clean is None else f"{clean:.4f}", "" if dirty is None else f"{dirty:.4f}",
                         str(cont.get("contaminated_items", "")) if cont else "n/a"])
    return rows


COLUMNS = ["task", "metric", "value", "stderr", "items", "clean", "contaminated", "contaminated items"]


def print_results(run: str | Path) -> None:
    doc = _load(run)
    t = Table(title=f"{doc['model']['name']}")
    for c in COLUMNS:
        t.add_column(c, justify="right" if c not in ("task", "metric") else "left")
    for r in _rows(doc):
        t.add_row(*r)
    console.print(t)


def eval_report(run: str | Path, workspace: str | Path | None = None) -> Path:
    """Print an eval run's table and write report.html (metrics with error bars, calibration) into the run folder.

    Args:
        run: Eval run folder (written by fmkit eval), or its name in the workspace's evals/.
        workspace: Workspace folder where a bare run name is looked up.
    """
    run = locate(run, "evals", workspace)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = _load(run)
    print_results(run)
    names, values, errs = [], [], []
    for task, res in doc["results"].items():
        for name, m in res["metrics"].items():
            names.append(f"{task}\n{name}")
            values.append(m["value"])
            errs.append(m["stderr"] if m["stderr"] == m["stderr"] else 0)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    ax.bar(range(len(names)), values, yerr=errs, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_title(f"{doc['model']['name']} (error bars: one standard error)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    table = "<table border=1 cellpadding=4><tr>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in _rows(doc)) + "</table>"
    page = Path(run) / "report.html"
    page.write_text(f"<!doctype html><meta charset=utf-8><title>fmkit eval report</title><body style='font-family:"
                    f"sans-serif'><h1>{html.escape(doc['model']['name'])}</h1><img src='data:image/png;base64,"
                    f"{base64.b64encode(buf.getvalue()).decode()}'>{table}<pre>"
                    f"{html.escape(json.dumps(doc['model'], indent=1))}</pre></body>")
    return page
