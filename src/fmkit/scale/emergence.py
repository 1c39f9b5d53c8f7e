"""`fmkit scale emergence RUNS`: each ladder run's model evaluated on eval tasks, scores plotted against training
compute with the chance level, each score's 95% interval, and where each task first departs from chance.

A score departs from chance when a one-sided exact binomial test of its correct items against the chance rate
(1 / choices, per item) rejects at 5% after Holm's adjustment over the task's runs: with a dozen runs per task, an
unadjusted test would mark a model that only guessed luckily about half the time.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import FmkitError
from ..evals.runner import evaluate
from ..progress import status
from ..select.stats import holm, wilson
from .runs import output_folder, run_folders, run_points

TASKS = ["stdlib_docstring_to_name", "stdlib_next_line"]


def binomial_above(k: int, n: int, p: float) -> float:
    """One-sided exact binomial p-value: P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k, n + 1)] if p < 1 else [0.0]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _evaluated(folder: Path, task: str, limit: int, workspace: str | None) -> Path:
    """The run's eval folder for `task`, evaluated once: reused while it is newer than the model it scored."""
    out = folder / "evals" / Path(task).name.removesuffix(".yaml")
    done = out / "results.json"
    if not (done.exists() and done.stat().st_mtime >= (folder / "fmkit.json").stat().st_mtime
            and json.loads(done.read_text())["config"]["limit"] == limit):
        evaluate(str(folder), [task], out=out, limit=limit, contamination=False, workspace=workspace)
    return out


def _score(out: Path, metric: str) -> tuple[str, dict]:
    """(task name, its score, items, chance rate, 95% interval and one-sided p-value against chance) from an eval
    run of one task."""
    task, result = next(iter(json.loads((out / "results.json").read_text())["results"].items()))
    if metric not in result["metrics"]:
        raise FmkitError(f"--metric {metric}: {task} reports {', '.join(sorted(result['metrics']))}")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    values = [r["scores"][metric] for r in rows if metric in r["scores"]]
    n = len(values)
    if any(v not in (0, 1, 0.0, 1.0, True, False) for v in values):
        raise FmkitError(f"--metric {metric} is not right-or-wrong per item; emergence needs an accuracy (acc, "
                         "acc_norm, exact_match, pass@1)")
    chance = float(np.mean([1 / len(r["choices"]) for r in rows])) if rows and "choices" in rows[0] else 0.0
    k = int(sum(values))
    return task, {"score": k / max(n, 1), "correct": k, "items": n, "chance": chance, "interval": wilson(k, n),
                  "p_value": binomial_above(k, n, chance)}


def emergence(runs: list[dict], alpha: float = 0.05) -> dict:
    """Per task: the runs' scores with Holm-adjusted p-values against chance, and the smallest compute at which a
    run departs from chance (None if none does). `runs` are dicts with compute and a `tasks` mapping of scores."""
    tasks = {}
    for task in sorted({t for r in runs for t in r["tasks"]}):
        rows = sorted(({"run": r["run"], "N": r["N"], "D": r["D"], "compute": r["compute"], **r["tasks"][task]}
                       for r in runs if task in r["tasks"]), key=lambda x: x["compute"])
        for row, p in zip(rows, holm([x["p_value"] for x in rows])):
            row["p_adjusted"], row["above_chance"] = p, p < alpha
        first = next((x for x in rows if x["above_chance"]), None)
        tasks[task] = {"chance": rows[0]["chance"], "runs": rows, "departs_at": first and first["compute"],
                       "departs_run": first and first["run"]}
    return tasks


def plot_emergence(tasks: dict, metric: str, out: Path) -> Path:
    """One panel per task: score against compute, coloured by size, with 95% intervals, the chance level and the
    range a guessing model lands in (the central 95% of Binomial(items, chance) / items), and the departure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), dpi=110, squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks.items()):
        rows = t["runs"]
        c = np.array([r["compute"] for r in rows])
        score = np.array([r["score"] for r in rows])
        lo, hi = np.array([r["interval"] for r in rows]).T
        ax.errorbar(c, score, yerr=[score - lo, hi - score], fmt="none", ecolor="0.6", zorder=2)
        sc = ax.scatter(c, score, c=np.log10([r["N"] for r in rows]), cmap="viridis", zorder=3)
        n = max(r["items"] for r in rows)
        band = [float(np.quantile(np.random.default_rng(0).binomial(n, t["chance"], 20000) / n, q))
                for q in (0.025, 0.975)]
        ax.axhline(t["chance"], color="r", ls="--", lw=1, label=f"chance ({t['chance']:.2f})")
        ax.axhspan(*band, color="r", alpha=0.08, label="95% range of guessing")
        if t["departs_at"]:
            ax.axvline(t["departs_at"], color="k", ls=":", lw=1,
                       label=f"departs from chance at C = {t['departs_at']:.2g}")
        ax.set_xscale("log")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("training compute C = 6ND (FLOPs)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    fig.colorbar(sc, ax=axes[0].tolist(), label="log10 parameters")
    fig.savefig(out)
    plt.close(fig)
    return out


def scale_emergence(runs: list[str], tasks: list[str] | None = None, metric: str = "acc", limit: int = 0,
                    out: str = "", workspace: str | None = None) -> Path:
    """Evaluate each finished run of a ladder on eval tasks and plot the scores against training compute.

    Each run's model is evaluated once per task (kept in RUN/evals/TASK and reused until the model changes). The
    plot marks chance, each score's 95% Wilson interval, the range a guessing model lands in, and the smallest
    compute whose score is above chance by a one-sided exact binomial test (Holm-adjusted over the task's runs).
    Writes emergence.json and emergence.png; returns the folder.

    Args:
        runs: Plan folders, run folders or folders of runs (finished runs with their models).
        tasks: Eval tasks: YAML files or built-in names (default: stdlib_docstring_to_name, stdlib_next_line).
        metric: Right-or-wrong metric per item to plot (acc, acc_norm, exact_match, ...).
        limit: Evaluate the first N items of each task (0: all).
        out: Folder for emergence.json and emergence.png (default: the first plan folder, else
            <workspace>/scale/emergence-<time>).
        workspace: Workspace folder (default: $FMKIT_WORKSPACE or ./fmkit-workspace).
    """
    tasks = list(tasks or TASKS)
    found = [(name, folder, n) for name, folder, n in run_folders(runs) if (folder / "fmkit.json").exists()]
    if not found:
        raise FmkitError(f"no finished runs in {', '.join(runs)}; run them first with `fmkit scale run PLAN`")
    scored = []
    for i, (name, folder, n) in enumerate(found, 1):
        final = [p for p in run_points(folder, n, name) if p["final"]]
        if not final:
            continue
        status(f"emergence: run {i}/{len(found)} {name}")
        p = final[0]
        scored.append({"run": name, "N": p["N"], "D": p["D"], "compute": 6 * p["N"] * p["D"], "loss": p["loss"],
                       "tasks": dict(_score(_evaluated(folder, t, limit, workspace), metric) for t in tasks)})
    result = {"metric": metric, "limit": limit, "tasks": emergence(scored), "sources": [str(Path(r).resolve())
                                                                                         for r in runs]}
    folder = output_folder(runs, out, "emergence", workspace)
    (folder / "emergence.json").write_text(json.dumps(result, indent=2))
    plot_emergence(result["tasks"], metric, folder / "emergence.png")
    return folder
