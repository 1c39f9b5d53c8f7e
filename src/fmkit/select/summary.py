"""Per candidate: every metric with a 95% interval, cost, latency percentiles, tokens and failures by reason; and
between every pair of candidates, on the items both answered, the paired test that fits each metric."""
from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np

from . import stats

# quality metrics where lower is better (all others: higher is better)
LOWER_IS_BETTER = {"brier", "ece_10bin", "ece_1bin", "toxicity_rate", "word_perplexity", "byte_perplexity",
                   "bits_per_byte", "attack_success_rate"}


def higher_is_better(metric: str) -> bool:
    """By the metric's name; a red-team rate per category (attack_success_rate/injection) is its metric's."""
    return not any(part in LOWER_IS_BETTER for part in metric.split("/"))


def _scores(records: list[dict]) -> dict:
    """{"suite/metric": {(suite, id): score}}"""
    out: dict = {}
    for r in records:
        for k, v in r["scores"].items():
            out.setdefault(f"{r['suite']}/{k}", {})[(r["suite"], r["id"])] = float(v)
    return out


def summarise(records: list[dict], metrics: list[str], iters: int = 2000, seed: int = 0) -> dict:
    scores = _scores(records)
    out = {}
    for m in metrics:
        values = list(scores.get(m, {}).values())
        if not values:
            continue
        binary = stats.is_binary(values)
        ci = stats.wilson(int(sum(values)), len(values)) if binary else stats.bootstrap_ci(values, iters, seed)
        out[m] = {"value": float(np.mean(values)), "ci": ci, "n": len(values),
                  "kind": "binary" if binary else "continuous", "higher_is_better": higher_is_better(m)}
    lat = [r["latency_ms"] for r in records if r.get("latency_ms") is not None]
    pt = [r["prompt_tokens"] for r in records if r.get("prompt_tokens") is not None]
    ct = [r["completion_tokens"] for r in records if r.get("completion_tokens") is not None]
    fails = Counter(r["failure"] for r in records if r.get("failure"))
    cost = float(sum(r.get("cost") or 0.0 for r in records))
    n = len(records)
    return {"items": n, "metrics": out,
            "cost": {"total": cost, "per_item": cost / max(1, n), "currency": "USD"},
            "latency_ms": {"p50": stats.percentile(lat, 50), "p95": stats.percentile(lat, 95),
                           "mean": float(np.mean(lat)) if lat else float("nan"), "n": len(lat),
                           "cached_unmeasured": sum(1 for r in records if r.get("cached"))},
            "tokens": {"prompt": int(sum(pt)) if pt else None, "completion": int(sum(ct)) if ct else None,
                       "completion_per_item": float(np.mean(ct)) if ct else None},
            "failures": {"total": sum(fails.values()), "rate": sum(fails.values()) / max(1, n),
                         "by_reason": dict(fails.most_common())},
            "judge_unparsable": sum(1 for r in records if r.get("judge_unparsable"))}


def _sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def pairwise(records: dict, prefs: dict, metrics: list[str], iters: int = 2000, seed: int = 0) -> list[dict]:
    """Every pair of candidates on every metric (and judge preferences), with raw and Holm-adjusted p-values over
    all of them together, and the minimum detectable effect at the number of shared items.

    Pass/fail metrics: exact McNemar; continuous ones: paired bootstrap; preferences: sign test. `diff` is always
    B minus A, with a paired-bootstrap 95% interval."""
    scores = {c: _scores(rs) for c, rs in records.items()}
    tests = []
    for a, b in combinations(list(records), 2):
        for m in metrics:
            sa, sb = scores[a].get(m, {}), scores[b].get(m, {})
            common = [k for k in sa if k in sb]
            if not common:
                continue
            xa, xb = [sa[k] for k in common], [sb[k] for k in common]
            n = len(common)
            boot = stats.paired_bootstrap(xa, xb, iters, seed)
            t = {"a": a, "b": b, "metric": m, "n": n, "a_value": float(np.mean(xa)), "b_value": float(np.mean(xb)),
                 "diff": boot["diff"], "ci": boot["ci"], "higher_is_better": higher_is_better(m)}
            if stats.is_binary(xa + xb):
                mc = stats.mcnemar(xa, xb)
                t.update(test="mcnemar", p_value=mc["p_value"], a_only=mc["a_only"], b_only=mc["b_only"],
                         mde=stats.mde_paired_proportions(n, (mc["a_only"] + mc["b_only"]) / n))
            else:
                d = np.asarray(xb) - np.asarray(xa)
                t.update(test="paired_bootstrap", p_value=boot["p_value"],
                         mde=stats.mde_paired_means(n, _sd(d), _sd(xa), _sd(xb)))
            tests.append(t)
    for (a, b), by_item in prefs.items():
        for suite in sorted({s for s, _ in by_item}):
            verdicts = [v for (s, _), v in by_item.items() if s == suite]
            wa, wb = verdicts.count("a"), verdicts.count("b")
            n = len(verdicts)
            signs = [1.0 if v == "b" else -1.0 if v == "a" else 0.0 for v in verdicts]
            boot = stats.paired_bootstrap([0.0] * n, signs, iters, seed)
            tests.append({"a": a, "b": b, "metric": f"{suite}/preference", "n": n, "a_value": wa / n,
                          "b_value": wb / n, "diff": boot["diff"], "ci": boot["ci"], "higher_is_better": True,
                          "test": "sign", "a_wins": wa, "b_wins": wb, "ties": n - wa - wb,
                          "p_value": stats.sign_test(wa, wb)["p_value"],
                          "mde": stats.mde_paired_proportions(n, (wa + wb) / n)})
    for t, adj in zip(tests, stats.holm([t["p_value"] for t in tests])):
        t["p_holm"] = adj
        t["significant"] = adj < stats.ALPHA
    return tests
