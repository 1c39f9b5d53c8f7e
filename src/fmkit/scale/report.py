"""`fmkit scale fit RUNS`: the scaling-law fit of a ladder's results, written as fit.json and two plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FmkitError
from .fit import Law, fit
from .runs import load_points, output_folder


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compute(points: list[dict], result: dict, out: Path, check: dict | None = None) -> Path:
    """Final loss against training compute (C = 6ND), coloured by size, with the fitted compute-optimal frontier
    and its bootstrap band, extended to the largest budget asked about; with `check` (compute, loss, predicted,
    interval), a run beyond the ladder drawn measured beside its prediction instead of the budgets' optima."""
    plt = _axes()
    law, reps = Law(**result["law"]), [Law(**r) for r in result["replicates"]]
    final = [p for p in points if p["final"]]
    c = np.array([6 * p["N"] * p["D"] for p in final])
    top = max([c.max()] + [o["compute"] for o in result["optimum"]] + ([check["compute"]] if check else []))
    grid = np.geomspace(c.min() / 2, top * 1.5, 60)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    sc = ax.scatter(c, [p["loss"] for p in final], c=np.log10([p["N"] for p in final]), cmap="viridis", zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 parameters")
    ax.plot(grid, [law.optimum(g)["loss"] for g in grid], "k-", label="fitted frontier L(N_opt, D_opt)")
    if reps:
        band = np.array([[r.optimum(g)["loss"] for g in grid] for r in reps])
        lo, hi = np.percentile(band, [2.5, 97.5], axis=0)
        ax.fill_between(grid, lo, hi, color="k", alpha=0.15, label="95% bootstrap band")
    if check:
        lo, hi = check["interval"]
        pred = check["predicted"]
        ax.errorbar([check["compute"]], [pred], yerr=[[pred - lo], [hi - pred]], fmt="r*", ms=11, capsize=3,
                    label=f"predicted {pred:.3f} (95% interval)")
        ax.plot([check["compute"]], [check["loss"]], "bD", ms=7, label=f"measured {check['loss']:.3f}")
    for o in [] if check else result["optimum"]:
        ax.errorbar([o["compute"]], [o["loss"]], yerr=[[o["loss"] - o["loss_interval"][0]],
                    [o["loss_interval"][1] - o["loss"]]], fmt="r*", ms=10, label=f"prediction at {o['compute']:.2g}")
    return _finish(plt, fig, ax, "training compute C = 6ND (FLOPs)", out)


def plot_size(points: list[dict], result: dict, out: Path) -> Path:
    """Final loss against N, with the fitted L(N, D) at the ladder's token budgets (each run is drawn with the
    curve of the budget nearest its own in log D)."""
    plt = _axes()
    law = Law(**result["law"])
    final = [p for p in points if p["final"]]
    ds = np.geomspace(min(p["D"] for p in final), max(p["D"] for p in final), 4)
    ns = np.geomspace(min(p["N"] for p in final) / 1.5, max(p["N"] for p in final) * 1.5, 50)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours = plt.cm.plasma(np.linspace(0.1, 0.85, len(ds)))
    for d, col in zip(ds, colours):
        ax.plot(ns, law.loss(ns, d), color=col, label=f"fit at D = {d:.2g} tokens")
        near = [p for p in final if np.argmin(np.abs(np.log(ds) - np.log(p["D"]))) == list(ds).index(d)]
        ax.scatter([p["N"] for p in near], [p["loss"] for p in near], color=col, zorder=3)
    return _finish(plt, fig, ax, "parameters N", out)


def _finish(plt, fig, ax, xlabel: str, out: Path) -> Path:
    """Log x axis, labels, grid and legend, saved to `out`: what both plots end with."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def scale_fit(runs: list[str], budgets: list[float] | None = None, bootstrap: int = 200, out: str = "",
              seed: int = 0, repeats: bool = True, workspace: str | None = None) -> Path:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to a ladder's runs and give the compute-optimal N and D per budget.

    Chinchilla's approach 3 (Huber loss on log-loss, L-BFGS from a grid) on each run's final loss, approach 1
    (the lowest-loss envelope over all losses) beside it, bootstrap intervals from resampling runs. Writes
    fit.json, loss_vs_compute.png and loss_vs_n.png; returns the folder.

    Args:
        runs: Plan folders, run folders (with metrics.jsonl), folders of runs, or JSON/CSV tables of N, D, loss.
        budgets: Training compute budgets (FLOPs) to give the optimum for (default: 4x the ladder's largest run).
        bootstrap: Bootstrap replicates for the intervals.
        out: Folder for fit.json and the plots (default: the first plan folder, else <workspace>/scale/fit-<time>).
        seed: Seed of the bootstrap's resampling.
        repeats: Fit the effective tokens of runs that pass over their shards more than once (Muennighoff et al.
            2023) rather than the tokens seen.
        workspace: Workspace folder (default: $FMKIT_WORKSPACE or ./fmkit-workspace).
    """
    points = load_points(runs)
    try:
        result = fit(points, budgets or (), bootstrap=bootstrap, seed=seed, repeats=repeats)
    except ValueError as e:
        raise FmkitError(str(e)) from None
    folder = output_folder(runs, out, "fit", workspace)
    result["sources"] = [str(Path(r).resolve()) for r in runs]
    result["table"] = points
    (folder / "fit.json").write_text(json.dumps(result, indent=2))
    plot_compute(points, result, folder / "loss_vs_compute.png")
    plot_size(points, result, folder / "loss_vs_n.png")
    return folder
