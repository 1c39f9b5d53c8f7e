"""Scaling laws: approach-3 fits recover known coefficients within their intervals, the published Chinchilla
coefficients' optimum, plans sized from a budget, a plan's runs trained through the loop with locks and resume, a
prediction beyond the ladder trained and compared, and eval scores against compute marked where they leave chance."""
import math
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from fmkit.errors import FmkitError
from fmkit.scale.check import scale_check
from fmkit.scale.emergence import binomial_above, emergence, scale_emergence
from fmkit.scale.fit import CHINCHILLA, EPOCH_REFIT, Law, effective_tokens, fit, fit_law, lbfgs
from fmkit.scale.plan import parse_duration, scale_plan
from fmkit.scale.report import scale_fit
from fmkit.scale.run import scale_run

TRUE = Law(E=1.8, A=300.0, B=900.0, alpha=0.33, beta=0.36)


def synthetic(law: Law, noise: float = 0.003, seed: int = 1) -> list[dict]:
    """An IsoFLOP ladder (5 compute levels x 6 sizes) with multiplicative noise on the losses."""
    rng = np.random.default_rng(seed)
    points = []
    for c in (1e15, 3e15, 1e16, 3e16, 1e17):
        for n in np.geomspace(2e5, 3e7, 6):
            d = c / 6 / n
            points.append({"run": f"{c:g}-{n:.0f}", "N": n, "D": d, "final": True,
                           "loss": float(law.loss(n, d) * np.exp(rng.normal(0, noise)))})
    return points


def test_lbfgs_finds_the_minimum_of_rosenbrock():
    def rosen(x):
        f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        g = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])
        return f, g

    x, f = lbfgs(rosen, np.array([-1.2, 1.0]), iters=2000)
    assert np.allclose(x, [1, 1], atol=1e-4) and f < 1e-8


def test_synthetic_coefficients_are_recovered_within_their_intervals():
    # each interval covers its coefficient 95% of the time, so all five only ~77%: the noise seed is fixed (seed 1
    # misses B by 0.03%, seeds 2 and 3 cover all five)
    result = fit(synthetic(TRUE, seed=2), budgets=[1e20], bootstrap=40)
    for key, value in vars(TRUE).items():
        lo, hi = result["intervals"][key]
        assert lo <= value <= hi, (key, value, lo, hi)
        assert abs(result["law"][key] / value - 1) < 0.1, key
    assert result["edge"] == [] and result["bootstrap"] == 40
    opt, truth = result["optimum"][0], TRUE.optimum(1e20)
    assert opt["N_interval"][0] <= truth["N"] <= opt["N_interval"][1]
    assert opt["D_interval"][0] <= truth["D"] <= opt["D_interval"][1]
    # approach 1's N_opt exponent against the law's own a = beta / (alpha + beta) = 0.52
    a1 = result["approach1"]["N_opt"]
    assert a1["exponent_interval"][0] <= TRUE.beta / (TRUE.alpha + TRUE.beta) <= a1["exponent_interval"][1]


def test_noiseless_losses_give_the_coefficients_exactly():
    law = fit_law(*zip(*[(p["N"], p["D"], p["loss"]) for p in synthetic(TRUE, noise=0)]))["law"]
    assert all(abs(getattr(law, k) / v - 1) < 1e-3 for k, v in vars(TRUE).items())


def test_repeated_tokens_count_as_muennighoffs_effective_data():
    u = 1e6
    assert effective_tokens(5e5, u) == 5e5 and effective_tokens(u, u) == u and effective_tokens(9e6, None) == 9e6
    assert effective_tokens(u * 1.001, u) == pytest.approx(u * 1.001, rel=1e-6)   # a second pass starts at full worth
    assert effective_tokens(1e12, u) == pytest.approx(u * (1 + 15.39))             # and saturates at U (1 + R*)
    # losses made from effective tokens, on data of 3e8 tokens that the larger runs pass over up to 30 times
    points = [dict(p, unique=3e8, loss=float(TRUE.loss(p["N"], effective_tokens(p["D"], 3e8))))
              for p in synthetic(TRUE, noise=0)]
    assert max(p["D"] for p in points) / 3e8 > 30
    exact = Law(**fit(points, bootstrap=0)["law"])
    assert all(abs(getattr(exact, k) / v - 1) < 1e-3 for k, v in vars(TRUE).items())
    naive = Law(**fit(points, bootstrap=0, repeats=False)["law"])
    assert abs(naive.beta / TRUE.beta - 1) > 0.05   # raw D misreads the flattening as a smaller beta


def test_an_irreducible_loss_beyond_the_grid_is_flagged():
    far = Law(E=30.0, A=300.0, B=900.0, alpha=0.33, beta=0.36)   # e = log 30 = 3.4, past the grid's 2
    assert "e" in fit_law(*zip(*[(p["N"], p["D"], p["loss"]) for p in synthetic(far, noise=0)]))["edge"]


def test_chinchilla_coefficients_and_their_tokens_per_parameter():
    published, refit = Law(**CHINCHILLA), Law(**EPOCH_REFIT)
    for c in (1e21, 1e22, 1e23):
        opt = published.optimum(c)
        assert opt["N"] * opt["D"] * 6 == pytest.approx(c)
        # the optimum: moving N either way along C = 6ND raises the loss
        for k in (0.9, 1.1):
            assert published.loss(opt["N"] * k, opt["D"] / k) > opt["loss"]
        # eq. 10's rounded coefficients put the optimum at 50-80 tokens per parameter (a known gap to approaches
        # 1 and 2); the refit of the paper's own data by Besiroglu et al. gives Chinchilla's ~20
        assert 45 < opt["tokens_per_param"] < 85
        assert 17 < refit.optimum(c)["tokens_per_param"] < 23
    assert published.beta / (published.alpha + published.beta) == pytest.approx(0.45, abs=0.01)   # paper: a = 0.46


def test_a_fit_refuses_too_few_runs():
    with pytest.raises(ValueError, match="at least 5"):
        fit(synthetic(TRUE)[:3])


def test_durations_are_parsed_and_bad_ones_named():
    assert parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400 and parse_duration("45s") == 45
    with pytest.raises(FmkitError, match="--time"):
        parse_duration("soon")


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory, shards_dir):
    tmp = tmp_path_factory.mktemp("scale")
    base = tmp / "base.yaml"
    base.write_text(yaml.safe_dump({"train": {"batch_size": 4, "seq_len": 32, "precision": "fp32", "lr": 3e-3,
                                              "device": "cpu", "keep_last": 0, "log_every": 1}}))
    return scale_plan(str(shards_dir), budget=1e9, sizes=["16x1", "32x1", "48x1"], out=str(tmp / "plan"),
                      val_shards=str(shards_dir), base=str(base), levels=2, per_level=3, ratio=2.0,
                      throughput=1e9, min_steps=3, workspace=str(tmp / "ws"))


def test_a_plan_spends_its_budget_on_isoflop_levels(tiny_plan):
    plan = json.loads((tiny_plan / "plan.json").read_text())
    assert len(plan["runs"]) == 6 and plan["total_compute"] == pytest.approx(1e9, rel=0.15)
    levels = sorted({r["run"].split("-c")[1] for r in plan["runs"]})
    assert len(levels) == 2
    for r in plan["runs"]:
        rec = yaml.safe_load(Path(r["recipe"]).read_text())
        assert rec["train"]["steps"] == r["steps"] >= 3 and rec["train"]["batch_size"] == 4
        assert rec["model"]["overrides"]["hidden_size"] == int(r["size"].split("x")[0])
    assert plan["sizes"][0]["N"] < plan["sizes"][1]["N"] < plan["sizes"][2]["N"]


def test_a_time_budget_is_sized_from_measured_throughput(tiny_plan, tmp_path, shards_dir):
    base = tiny_plan.parent / "base.yaml"
    folder = scale_plan(str(shards_dir), time_budget="20s", sizes=["16x1", "32x1", "48x1"], out=str(tmp_path / "p"),
                        base=str(base), levels=2, per_level=3, min_steps=1, workspace=str(tmp_path / "ws"))
    plan = json.loads((folder / "plan.json").read_text())
    assert all(s["flops_per_s"] > 0 for s in plan["sizes"]) and plan["predicted_s"] == pytest.approx(20, rel=0.2)


def test_scale_run_trains_skips_finished_and_held_runs_and_the_fit_reads_them(tiny_plan, one_thread):
    runs = sorted(json.loads((tiny_plan / "plan.json").read_text())["runs"], key=lambda r: r["compute"])
    first, second, held = runs[0]["run"], runs[1]["run"], runs[2]["run"]
    (tiny_plan / "locks").mkdir(exist_ok=True)
    (tiny_plan / "locks" / f"{held}.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    scale_run(str(tiny_plan), only=[first, held])
    assert (tiny_plan / "runs" / first / "fmkit.json").exists()
    assert not (tiny_plan / "runs" / held / "metrics.jsonl").exists()   # another live process holds it
    # a run killed part-way (a checkpoint, no model yet) resumes rather than starting over
    os.remove(tiny_plan / "runs" / first / "fmkit.json")
    steps_before = len((tiny_plan / "runs" / first / "metrics.jsonl").read_text().splitlines())
    scale_run(str(tiny_plan), only=[first, second])
    assert len((tiny_plan / "runs" / first / "metrics.jsonl").read_text().splitlines()) == steps_before
    assert not (tiny_plan / "locks" / f"{first}.lock").exists()
    table = tiny_plan.parent / "more.json"
    table.write_text(json.dumps([{k: p[k] for k in ("run", "N", "D", "loss")} for p in synthetic(TRUE)]))
    folder = scale_fit([str(tiny_plan / "runs"), str(table)], budgets=[1e18], bootstrap=10,
                       out=str(tiny_plan / "fit"))
    result = json.loads((folder / "fit.json").read_text())
    measured = [p for p in result["table"] if p["run"] in (first, second)]
    assert {p["run"] for p in measured if p["final"]} == {first, second}
    assert any(not p["final"] for p in measured) and all(p["metric"] == "val_loss" for p in measured)
    assert (folder / "loss_vs_compute.png").stat().st_size and (folder / "loss_vs_n.png").stat().st_size
    with pytest.raises(FmkitError, match="not a plan folder"):
        scale_fit([str(tiny_plan / "nowhere")])


def test_the_check_run_is_refused_before_the_ladder_finishes_then_predicted_trained_and_compared(tiny_plan,
                                                                                                   one_thread):
    with pytest.raises(FmkitError, match="not finished"):
        scale_check(str(tiny_plan))
    for lock in (tiny_plan / "locks").glob("*.lock"):   # the lock an earlier test held for a live process
        lock.unlink()
    scale_run(str(tiny_plan))
    plan = json.loads((tiny_plan / "plan.json").read_text())
    largest = max(r["compute"] for r in plan["runs"])
    with pytest.raises(FmkitError, match="--size 999x9"):
        scale_check(str(tiny_plan), size="999x9")
    r = scale_check(str(tiny_plan), factor=3.0, bootstrap=10)
    assert r["run"]["compute"] == pytest.approx(3 * largest, rel=0.1)   # whole steps round the compute
    nearest = min(plan["sizes"], key=lambda s: abs(math.log(s["N"] / r["optimum"]["N"])))
    assert r["run"]["size"] == nearest["size"]
    measured = json.loads((Path(r["run"]["out"]) / "metrics.jsonl").read_text().splitlines()[-1])
    assert r["measured"] == pytest.approx(measured["val_loss"])
    assert r["error"] == pytest.approx((r["predicted"] - r["measured"]) / r["measured"])
    assert r["inside_interval"] == (r["interval"][0] <= r["measured"] <= r["interval"][1])
    assert json.loads((tiny_plan / "check" / "check.json").read_text())["measured"] == r["measured"]
    assert (tiny_plan / "check" / "check.png").stat().st_size
    again = scale_check(str(tiny_plan), factor=3.0, bootstrap=10)   # the trained run is reused, not retrained
    assert again["measured"] == r["measured"]


def test_the_one_sided_binomial_matches_its_sum():
    n, p = 30, 0.25
    pmf = [math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(n + 1)]
    for k in (0, 5, 8, 15, 30):
        assert binomial_above(k, n, p) == pytest.approx(sum(pmf[k:]), rel=1e-9)
    assert binomial_above(1, 10, 0.0) == 0.0


def test_departure_from_chance_is_the_first_compute_significant_after_holm():
    def run(c, k, n=100):
        return {"run": f"r{c:g}", "N": 1e5, "D": c / 6e5, "compute": c,
                "tasks": {"t": {"score": k / n, "correct": k, "items": n, "chance": 0.25,
                                "p_value": binomial_above(k, n, 0.25)}}}

    # 34/100 at chance 1/4: p = 0.028 alone, 0.083 after Holm (second smallest of four, x3); 60/100 is far above
    t = emergence([run(1e12, 60), run(1e10, 24), run(1e9, 27), run(1e11, 34)])["t"]
    assert [x["compute"] for x in t["runs"]] == [1e9, 1e10, 1e11, 1e12]
    assert binomial_above(34, 100, 0.25) < 0.05 and not t["runs"][2]["above_chance"]
    assert t["departs_at"] == 1e12 and t["departs_run"] == "r1e+12"
    assert emergence([run(1e9, 25), run(1e10, 26)])["t"]["departs_at"] is None


def test_emergence_evaluates_each_run_once_and_plots_scores_against_compute(tiny_plan, one_thread):
    for lock in (tiny_plan / "locks").glob("*.lock"):
        lock.unlink()
    scale_run(str(tiny_plan))
    folder = scale_emergence([str(tiny_plan)], tasks=["stdlib_docstring_to_name"], limit=12)
    result = json.loads((folder / "emergence.json").read_text())
    t = result["tasks"]["stdlib_docstring_to_name"]
    assert t["chance"] == pytest.approx(0.25) and len(t["runs"]) == 6
    assert [x["compute"] for x in t["runs"]] == sorted(x["compute"] for x in t["runs"])
    for x in t["runs"]:
        assert x["items"] == 12 and x["interval"][0] <= x["score"] <= x["interval"][1]
        assert x["p_adjusted"] >= x["p_value"]
    assert (folder / "emergence.png").stat().st_size
    done = Path(json.loads((tiny_plan / "plan.json").read_text())["runs"][0]["out"]) / "evals" / "stdlib_docstring_to_name"
    stamp = (done / "results.json").stat().st_mtime
    scale_emergence([str(tiny_plan)], tasks=["stdlib_docstring_to_name"], limit=12)
    assert (done / "results.json").stat().st_mtime == stamp
    with pytest.raises(FmkitError, match="right-or-wrong"):
        scale_emergence([str(tiny_plan)], tasks=["stdlib_docstring_to_name"], metric="brier", limit=12)
