"""`fmkit scale check PLAN`: the fit held to account. Fit L(N, D) on the ladder, predict the loss of a run with
`factor` times the ladder's largest compute at the fitted compute-optimal size, train that run, and compare."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FmkitError
from ..train.checkpoint import list_checkpoints
from ..train.pretrain import pretrain
from .fit import Law, _interval, effective_tokens, fit
from .plan import write_run
from .report import plot_compute
from .runs import load_points, run_points, unique_tokens


def scale_check(plan: str, factor: float = 4.0, size: str = "", bootstrap: int = 200, seed: int = 0,
                repeats: bool = True, workspace: str | None = None) -> dict:
    """Predict a run beyond the ladder, train it, and report predicted against measured loss.

    The run has `factor` x the largest compute of the ladder and the size of the plan's table nearest the fitted
    compute-optimal N (or --size); its loss is predicted from the fit on the ladder's finished runs alone, with
    the 95% interval of the bootstrap replicates. The run trains in PLAN/check (resumable), and check.json and
    check.png (the loss-vs-compute plot with the measured point) are written there.

    Args:
        plan: Plan folder written by `fmkit scale plan`, its runs finished by `fmkit scale run`.
        factor: The check run's compute as a multiple of the ladder's largest run.
        size: A size of the plan's table to train (default: the one nearest the fitted optimum).
        bootstrap: Bootstrap replicates for the prediction's interval.
        seed: Seed of the bootstrap's resampling.
        repeats: Count the tokens of passes after the first over the shards as Muennighoff et al. (2023) do, in
            the fit and the prediction, rather than as fresh data.
        workspace: Workspace folder (default: the plan's recipes' own).
    """
    folder = Path(plan)
    if not (folder / "plan.json").exists():
        raise FmkitError(f"{plan} has no plan.json; write one with `fmkit scale plan`")
    if factor <= 1:
        raise FmkitError(f"--factor {factor}: the check run must lie beyond the ladder (above 1)")
    meta = json.loads((folder / "plan.json").read_text())
    points = load_points([plan])
    unfinished = [r["run"] for r in meta["runs"] if not (Path(r["out"]) / "fmkit.json").exists()]
    if unfinished:
        raise FmkitError(f"{len(unfinished)} runs of {plan} are not finished ({', '.join(unfinished[:3])}...); "
                         "run `fmkit scale run PLAN` first")
    compute = factor * max(6 * p["N"] * p["D"] for p in points if p["final"])
    try:
        result = fit(points, [compute], bootstrap=bootstrap, seed=seed, repeats=repeats)
    except ValueError as e:
        raise FmkitError(str(e)) from None
    optimum = result["optimum"][0]
    sizes = {s["size"]: s for s in meta["sizes"]}
    if size and size not in sizes:
        raise FmkitError(f"--size {size}: the plan measured {', '.join(sizes)}")
    chosen = sizes[size] if size else min(meta["sizes"], key=lambda s: abs(np.log(s["N"] / optimum["N"])))
    overrides = {"data.shards": meta["shards"], "data.val_shards": meta["val_shards"]}
    run = write_run(folder / "check", chosen, compute, meta.get("base", ""), overrides,
                    workspace or _recipe_workspace(meta))
    law, laws = Law(**result["law"]), [Law(**r) for r in result["replicates"]]
    tokens = effective_tokens(run["D"], unique_tokens(meta["shards"])) if repeats else run["D"]
    predicted = float(law.loss(run["N"], tokens))
    interval = _interval([float(lw.loss(run["N"], tokens)) for lw in laws], result["level"])
    out = Path(run["out"])
    if not (out / "fmkit.json").exists():
        pretrain(run["recipe"], resume=bool(list_checkpoints(out / "checkpoints")), workspace=workspace)
    measured = next(p for p in run_points(out, run["N"], run["run"]) if p["final"])["loss"]
    report = {"run": run, "effective_tokens": tokens, "repeats": result["repeats"], "factor": factor,
              "optimum": optimum, "predicted": predicted, "interval": interval,
              "measured": measured, "error": (predicted - measured) / measured,
              "inside_interval": interval[0] <= measured <= interval[1], "law": result["law"],
              "intervals": result["intervals"], "metric": points[0].get("metric", "loss"),
              "ladder_runs": result["runs"], "ladder_max_compute": compute / factor}
    (folder / "check" / "check.json").write_text(json.dumps(report, indent=2))
    plot_compute(points, result, folder / "check" / "check.png",
                 check={"compute": run["compute"], "loss": measured, "predicted": predicted, "interval": interval})
    return report


def _recipe_workspace(meta: dict) -> str:
    """The workspace the ladder's own recipes train into."""
    import yaml

    return yaml.safe_load(Path(meta["runs"][0]["recipe"]).read_text()).get("workspace", "")
