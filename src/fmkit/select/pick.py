"""The pick under the user's constraints, and the Pareto set of quality x cost x latency.

Requirements are `FIELD OP NUMBER` (`latency_p95_ms<1500`, `cost_per_item<=0.002`, `qa/pass>=0.8`). Among the
candidates that meet them, the best is the one with the highest quality metric; a candidate is *as good* as the
best when it is worse by at most `tolerance`, or when the paired test against the best finds no significant
difference (Holm-adjusted p >= 0.05). `prefer` then chooses among those: `cost` the cheapest, `latency` the
fastest (p95), `quality` the best itself.
"""
from __future__ import annotations

import math
import operator
import re

from ..errors import FmkitError

OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
       ">": operator.gt}
_REQ = re.compile(r"^\s*([\w@./-]+?)\s*(<=|>=|==|!=|<|>)\s*(-?[\d.]+(?:e-?\d+)?)\s*$")


def facts(s: dict) -> dict:
    """The flat fields a requirement may name, for one candidate's summary."""
    out = {"cost_per_item": s["cost"]["per_item"], "cost_total": s["cost"]["total"],
           "latency_p50_ms": s["latency_ms"]["p50"], "latency_p95_ms": s["latency_ms"]["p95"],
           "latency_mean_ms": s["latency_ms"]["mean"], "failure_rate": s["failures"]["rate"],
           "completion_tokens_per_item": s["tokens"]["completion_per_item"]}
    for m, v in s["metrics"].items():
        out[m] = v["value"]
        short = m.split("/", 1)[1]
        out.setdefault(short, v["value"])   # a bare metric name where one suite has it
    return out


def parse_requirement(text: str, known: list[str]) -> tuple[str, str, float]:
    m = _REQ.match(text)
    if not m:
        raise FmkitError(f"--require takes FIELD<NUMBER (or <=, >, >=, ==, !=), e.g. latency_p95_ms<1500; got {text!r}")
    name, op, value = m.group(1), m.group(2), float(m.group(3))
    if name not in known:
        raise FmkitError(f"--require {text!r}: unknown field '{name}' (known: {', '.join(known)})")
    return name, op, value


def _test(tests: list[dict], metric: str, x: str, y: str) -> dict | None:
    return next((t for t in tests if t["metric"] == metric and {t["a"], t["b"]} == {x, y}), None)


def choose(summaries: dict, tests: list[dict], metric: str, require: list[str], prefer: str,
           tolerance: float) -> dict:
    """{candidate, best, as_good, eligible, excluded: {name: why}, why: [sentences]}."""
    table = {c: facts(s) for c, s in summaries.items()}
    known = sorted(set().union(*(t.keys() for t in table.values())))
    reqs = [parse_requirement(r, known) for r in require]
    excluded = {}
    for c, f in table.items():
        for name, op, value in reqs:
            got = f.get(name)
            if got is None or (isinstance(got, float) and math.isnan(got)) or not OPS[op](got, value):
                excluded[c] = f"{name} = {_fmt(got)} fails {name}{op}{value:g}"
                break
    eligible = [c for c in table if c not in excluded]
    if metric not in (m for s in summaries.values() for m in s["metrics"]):
        raise FmkitError(f"--metric '{metric}' is not a metric of this comparison (metrics: "
                         f"{', '.join(sorted({m for s in summaries.values() for m in s['metrics']}))})")
    out = {"metric": metric, "prefer": prefer, "tolerance": tolerance, "require": list(require),
           "eligible": eligible, "excluded": excluded, "candidate": None, "best": None, "as_good": [], "why": []}
    scored = [c for c in eligible if metric in summaries[c]["metrics"]]
    if not scored:
        out["why"].append("no candidate meets the requirements" if not eligible else f"no eligible candidate has "
                          f"{metric}")
        return out
    sign = 1 if summaries[scored[0]]["metrics"][metric]["higher_is_better"] else -1
    quality = {c: summaries[c]["metrics"][metric]["value"] for c in scored}
    best = max(scored, key=lambda c: sign * quality[c])
    as_good, notes = [best], {}
    for c in scored:
        if c == best:
            continue
        gap = sign * (quality[best] - quality[c])
        t = _test(tests, metric, c, best)
        if gap <= tolerance:
            as_good.append(c)
            notes[c] = f"within the tolerance of {tolerance:g} of '{best}' ({metric} {_fmt(quality[c])} vs " \
                       f"{_fmt(quality[best])})"
        elif t is not None and not t["significant"]:
            as_good.append(c)
            notes[c] = (f"not significantly worse than '{best}' on {metric} ({_fmt(quality[c])} vs "
                        f"{_fmt(quality[best])}, Holm p = {t['p_holm']:.3g}; a difference below "
                        f"{_fmt(t['mde'])} could have been missed at n = {t['n']})")
    key = {"cost": lambda c: (table[c]["cost_per_item"], -sign * quality[c]),
           "latency": lambda c: (_num(table[c]["latency_p95_ms"]), -sign * quality[c]),
           "quality": lambda c: (-sign * quality[c], table[c]["cost_per_item"])}[prefer]
    pick = min(as_good, key=key)
    why = [f"best on {metric}: '{best}' ({_fmt(quality[best])})"]
    why += [f"'{c}' is {notes[c]}" for c in as_good if c in notes]
    how = {"cost": f"the cheapest ({table[pick]['cost_per_item']:.6g} USD per item)",
           "latency": f"the fastest (p95 {_fmt(table[pick]['latency_p95_ms'])} ms)",
           "quality": "the best"}[prefer]
    why.append(f"picked '{pick}': {how} of the {len(as_good)} candidate(s) as good as the best" if len(as_good) > 1
               else f"picked '{pick}': no other candidate is as good")
    for c, reason in excluded.items():
        why.append(f"'{c}' excluded: {reason}")
    out.update(candidate=pick, best=best, as_good=as_good, why=why)
    return out


def pareto(summaries: dict, metric: str) -> list[dict]:
    """Rows of quality, cost per item and p95 latency per candidate, each marked whether it is on the Pareto front
    (no other candidate is at least as good on all three and better on one)."""
    rows = []
    for c, s in summaries.items():
        if metric not in s["metrics"]:
            continue
        sign = 1 if s["metrics"][metric]["higher_is_better"] else -1
        rows.append({"candidate": c, "quality": s["metrics"][metric]["value"], "cost_per_item": s["cost"]["per_item"],
                     "latency_p95_ms": s["latency_ms"]["p95"], "_key": (sign * s["metrics"][metric]["value"],
                                                                        -s["cost"]["per_item"],
                                                                        -_num(s["latency_ms"]["p95"]))})
    for r in rows:
        r["pareto"] = not any(all(x >= y for x, y in zip(o["_key"], r["_key"])) and o["_key"] != r["_key"]
                              for o in rows)
    for r in rows:
        del r["_key"]
    return rows


def _num(x) -> float:
    return float("inf") if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
