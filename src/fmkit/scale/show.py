"""How the command line shows the scale verbs' results (the functions return paths and dicts; --json prints those)."""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from ..progress import report


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    report.print(table)


def show_plan(folder: Path, kw=None) -> None:
    plan = json.loads((Path(folder) / "plan.json").read_text())
    _table(f"scale plan {folder}", ["run", "parameters", "tokens", "steps", "FLOPs", "predicted s"],
           [[r["run"], f"{r['N']:,}", f"{r['D']:,}", str(r["steps"]), f"{r['compute']:.3g}",
             f"{r['predicted_s']:.0f}"] for r in plan["runs"]])
    for d in plan["dropped"]:
        report.print(f"dropped {d['run']}: {d['steps']} steps, {d['reason']}", highlight=False)
    report.print(f"{len(plan['runs'])} runs, {plan['total_compute']:.3g} FLOPs, about "
                 f"{plan['predicted_s'] / 60:.0f} min here; next: fmkit scale run {folder}", highlight=False)


def show_run(folder: Path, kw=None) -> None:
    runs = json.loads((Path(folder) / "plan.json").read_text())["runs"]
    done = sum((Path(r["out"]) / "fmkit.json").exists() for r in runs)
    report.print(f"{done}/{len(runs)} runs of {folder} finished"
                 + (f"; next: fmkit scale fit {folder}" if done == len(runs) else
                    "; the rest are held by other processes or were not asked for"), highlight=False)


def _ci(value: float, interval: list[float], fmt: str = ".3g") -> str:
    return f"{value:{fmt}} [{interval[0]:{fmt}}, {interval[1]:{fmt}}]"


def show_fit(folder: Path, kw=None) -> None:
    r = json.loads((Path(folder) / "fit.json").read_text())
    law, ci = r["law"], r["intervals"]
    report.print(f"L(N, D) = E + A/N^alpha + B/D^beta on {r['points']} runs ({r['bootstrap']} bootstrap "
                 f"replicates, {r['level']:.0%} intervals):", highlight=False)
    for k in ("E", "A", "B", "alpha", "beta"):
        report.print(f"  {k:<6}{_ci(law[k], ci[k])}", highlight=False)
    if r.get("repeats"):
        report.print("  D fitted as effective tokens: some runs pass over their shards more than once "
                     "(Muennighoff et al. 2023, R* = 15.4)", highlight=False)
    if r["edge"]:
        report.print(f"  on the grid's edge: {', '.join(r['edge'])} (the ladder does not pin them down)",
                     highlight=False)
    _table("compute-optimal size", ["budget (FLOPs)", "N", "D", "tokens/param", "loss"],
           [[f"{o['compute']:.3g}", _ci(o["N"], o["N_interval"]), _ci(o["D"], o["D_interval"]),
             _ci(o["tokens_per_param"], o["tokens_per_param_interval"], ".1f"),
             _ci(o["loss"], o["loss_interval"], ".3f")] for o in r["optimum"]])
    report.print(f"fit.json, loss_vs_compute.png and loss_vs_n.png in {folder}", highlight=False)


def show_check(r: dict, kw=None) -> None:
    run = r["run"]
    verdict = "inside" if r["inside_interval"] else "OUTSIDE"
    worth = f" (worth {r['effective_tokens']:,.0f} fresh)" if r["effective_tokens"] < run["D"] else ""
    report.print(f"check run {run['run']}: {run['N']:,} parameters, {run['D']:,} tokens{worth}, "
                 f"{run['compute']:.3g} FLOPs ({r['factor']:g}x the ladder's largest)\n"
                 f"  predicted {r['metric']} {_ci(r['predicted'], r['interval'], '.4f')}\n"
                 f"  measured  {r['measured']:.4f}: error {r['error']:+.2%}, {verdict} the interval\n"
                 f"check.json and check.png in {Path(run['out']).parent.parent}", highlight=False)


def show_emergence(folder: Path, kw=None) -> None:
    r = json.loads((Path(folder) / "emergence.json").read_text())
    for task, t in r["tasks"].items():
        _table(f"{task} ({r['metric']}, chance {t['chance']:.3f})", ["run", "FLOPs", r["metric"], "95% interval",
                                                                      "p vs chance (Holm)"],
               [[x["run"], f"{x['compute']:.3g}", f"{x['score']:.3f}",
                 f"[{x['interval'][0]:.3f}, {x['interval'][1]:.3f}]",
                 f"{x['p_adjusted']:.3g}" + (" *" if x["above_chance"] else "")] for x in t["runs"]])
        report.print(f"{task}: " + (f"departs from chance at C = {t['departs_at']:.3g} ({t['departs_run']})"
                                    if t["departs_at"] else "no run is above chance"), highlight=False)
    report.print(f"emergence.json and emergence.png in {folder}", highlight=False)
