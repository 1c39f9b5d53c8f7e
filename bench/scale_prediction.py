"""Scaling-law prediction held to account: a ladder fitted, a run at 4x its largest compute predicted and measured.

    python bench/scale_prediction.py [--plan FOLDER] [--time 30m] [--factor 4] [--emergence]

On the quickstart's stdlib shards ($FMKIT_WORKSPACE or ./fmkit-workspace; run `fmkit quickstart` first): plan a
ladder sized to --time on this machine (`fmkit scale plan`, skipped when --plan already holds one), train it
(`fmkit scale run`, resuming whatever is done), fit L(N, D) by approach 3 (`fmkit scale fit`), then predict and
train the run of --factor x the ladder's largest compute at the fitted optimum's size (`fmkit scale check`).
Prints the ladder's planned and measured wall time, the fit, and predicted against measured validation loss with
the bootstrap interval. The targets: within 2%, and inside the interval. --emergence also evaluates every run on
the stdlib tasks (`fmkit scale emergence`). Plots land in the plan folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", help="plan folder (default: <workspace>/scale/bench-ladder)")
    ap.add_argument("--time", default="30m", help="wall time of the ladder on this machine")
    ap.add_argument("--factor", type=float, default=4.0, help="the check run's compute over the ladder's largest")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--emergence", action="store_true", help="also plot eval scores against compute")
    ap.add_argument("--workspace", default=os.environ.get("FMKIT_WORKSPACE", "fmkit-workspace"))
    args = ap.parse_args()

    from common import machine

    from fmkit.scale.check import scale_check
    from fmkit.scale.emergence import scale_emergence
    from fmkit.scale.plan import scale_plan
    from fmkit.scale.report import scale_fit
    from fmkit.scale.run import scale_run
    from fmkit.scale.show import show_emergence, show_fit

    ws = Path(args.workspace)
    if not (ws / "shards" / "stdlib-train" / "index.json").exists():
        raise SystemExit(f"no stdlib shards in {ws}: run `fmkit quickstart --workspace {ws}` first")
    plan = Path(args.plan) if args.plan else ws / "scale" / "bench-ladder"
    if not (plan / "plan.json").exists():
        scale_plan(time_budget=args.time, out=str(plan), workspace=str(ws))
    meta = json.loads((plan / "plan.json").read_text())
    started = time.time()
    scale_run(str(plan), workspace=str(ws))
    ladder_s = time.time() - started
    trained = [json.loads((Path(r["out"]) / "fmkit.json").read_text()) for r in meta["runs"]]
    scale_fit([str(plan)], bootstrap=args.bootstrap)
    show_fit(plan)
    started = time.time()
    r = scale_check(str(plan), factor=args.factor, bootstrap=args.bootstrap, workspace=str(ws))
    check_s = time.time() - started
    run = r["run"]
    print(f"\nmachine: {machine()}")
    print(f"ladder: {len(meta['runs'])} runs, {meta['total_compute']:.3g} FLOPs, planned {meta['predicted_s'] / 60:.1f}"
          f" min, trained in this call {ladder_s / 60:.1f} min (0 if it was done before); runs' own training time "
          f"{sum(t['final_metrics'].get('elapsed_s', 0) for t in trained) / 60:.1f} min")
    print(f"check run {run['run']}: {run['N']:,} parameters x {run['D']:,} tokens = {run['compute']:.3g} FLOPs "
          f"({args.factor:g}x the largest), fitted optimum N = {r['optimum']['N']:,.0f}; {check_s / 60:.1f} min")
    print(f"{'':<12}{'val loss':>10}  {'95% interval':>20}")
    print(f"{'predicted':<12}{r['predicted']:>10.4f}  [{r['interval'][0]:.4f}, {r['interval'][1]:.4f}]")
    print(f"{'measured':<12}{r['measured']:>10.4f}")
    print(f"error {r['error']:+.2%} (target within 2%: {'met' if abs(r['error']) <= 0.02 else 'MISSED'}); "
          f"measured {'inside' if r['inside_interval'] else 'OUTSIDE'} the interval")
    print(f"plots: {plan / 'loss_vs_compute.png'}, {plan / 'loss_vs_n.png'}, {plan / 'check' / 'check.png'}")
    if args.emergence:
        show_emergence(scale_emergence([str(plan)], workspace=str(ws)))


if __name__ == "__main__":
    main()
