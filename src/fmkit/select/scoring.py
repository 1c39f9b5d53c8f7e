"""From answers to scored records: assertions, reference scores, judge ratings and preferences, failure reasons.

Per row, `pass` is 1 when every assertion holds (an assertion that cannot be judged, such as max_tokens where no
tokens are reported, is left out), or, for a row with a reference and no assertions, when the output equals the
reference (stripped, case-insensitive). Each assertion kind is also a metric of its own, over the rows that use it.
"""
from __future__ import annotations

from itertools import combinations

from . import judging
from .answers import Store
from .assertions import failure_reason, normalise, python_key, python_program, run_check, run_python, token_f1


def _python_verdicts(suite, answers: dict, store: Store) -> dict:
    """Verdicts of every python assertion over every candidate's answers, run in the sandbox once each."""
    jobs, verdicts = {}, {}
    for per_item in answers.values():
        for item in suite.items:
            out = (per_item.get(item.id) or {}).get("output")
            for check in item.checks:
                if check.kind != "python" or out is None:
                    continue
                key = python_key(check, out, item.raw)
                got = store.get("py-" + key)
                if got is not None:
                    verdicts[key] = tuple(got)
                else:
                    jobs[key] = (python_program(check, out, item.raw), check.options.get("timeout_s", 10))
    if jobs:
        for key, verdict in run_python(jobs).items():
            store.put("py-" + key, list(verdict))
            verdicts[key] = verdict
    return verdicts


def score_rows(suite, answers: dict, store: Store, judge=None) -> tuple[dict, dict]:
    """({candidate: [record per row]}, {(a, b): {item id: 'a' | 'b' | 'tie'}}) for a rows suite."""
    verdicts = _python_verdicts(suite, answers, store)
    records = {}
    for cand, per_item in answers.items():
        rows = []
        for item in suite.items:
            a = per_item[item.id]
            checks = [run_check(c, a, verdicts, item.raw) for c in item.checks]
            scores = {}
            for kind in dict.fromkeys(c["kind"] for c in checks):
                judged = [c["passed"] for c in checks if c["kind"] == kind and c["passed"] is not None]
                if judged:
                    scores[kind] = float(all(judged))
            judged = [c["passed"] for c in checks if c["passed"] is not None]
            if judged:
                scores["pass"] = float(all(judged))
            if item.reference is not None:
                out = a.get("output") or ""
                scores["exact_match"] = float(normalise(out) == normalise(item.reference))
                scores["token_f1"] = token_f1(out, item.reference)
                if not item.checks:
                    scores["pass"] = scores["exact_match"]
            rows.append({"candidate": cand, "suite": suite.name, "id": item.id, "input": item.input,
                         "output": a.get("output"), "reference": item.reference, "scores": scores, "checks": checks,
                         **{k: a.get(k) for k in ("latency_ms", "prompt_tokens", "completion_tokens", "cost",
                                                  "cached", "error")},
                         "failure": failure_reason(a, checks)})
        records[cand] = rows
    prefs = {}
    rubric = [i for i, item in enumerate(suite.items) if item.rubric]
    if rubric and judge is not None:
        names = list(records)
        jobs = [(n, i) for n in names for i in rubric]
        ratings = judging.rate(judge, store, [(suite.items[i].rubric, suite.items[i].input,
                                              records[n][i]["output"]) for n, i in jobs])
        for (n, i), r in zip(jobs, ratings):
            if r is None:
                records[n][i]["judge_unparsable"] = True
            else:
                records[n][i]["scores"]["rubric"] = r
        for a, b in combinations(names, 2):
            verdicts = judging.prefer(judge, store, [(suite.items[i].rubric, suite.items[i].input,
                                                      records[a][i]["output"], records[b][i]["output"])
                                                     for i in rubric])
            prefs[(a, b)] = {suite.items[i].id: v for i, v in zip(rubric, verdicts)}
    return records, prefs
