"""`fmkit compare`: candidates on the same suites, with paired tests between them and a pick under constraints.

Writes a run folder (default <workspace>/compares/NAME): results.json (per candidate metrics with 95% intervals,
cost, latency, failures; pairwise tests with raw and Holm-adjusted p-values and the minimum detectable effect; the
pick and why; the Pareto set), samples.jsonl (one row per candidate x item), report.html, and answers.jsonl, the
store that makes an interrupted run resumable.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from ..errors import FmkitError
from ..progress import progress_bar, status
from ..providers import Model
from ..workspace import Workspace, write_manifest
from . import pick as P
from .answers import Store, ask_rows, run_task
from .candidates import load_candidates, open_judge, open_model
from .scoring import score_rows
from .suite import load_suites
from .summary import pairwise, summarise


class _Opener:
    """Opens a candidate's model when it is first needed; a local model is loaded once and shared."""

    def __init__(self, c, workspace, cache, prices):
        self.c, self.workspace, self.cache, self.prices = c, workspace, cache, prices
        self.local, self.described = None, {}

    def __call__(self, concurrency: int) -> Model:
        if self.local is not None:
            return self.local
        m = open_model(self.c, self.workspace, self.cache, self.prices, concurrency)
        self.described = m.describe()
        if hasattr(m, "enc"):
            self.local = m
        return m


def compare(candidates: str, suites: list[str], out: str | None = None, require: list[str] | None = None,
            prefer: Literal["quality", "cost", "latency"] = "quality", tolerance: float = 0.0, metric: str = "",
            judge: str = "", judge_base_url: str = "", limit: int = 0, cache: str | None = None,
            prices: str | None = None, bootstrap: int = 2000, seed: int = 0, workspace: str | Path | None = None,
            judge_model: Model | None = None) -> dict:
    """Compare candidate models on the same suites: paired tests between them, a pick, report.html.

    Prints the table on stderr and returns the results (also in RUN/results.json). `judge_model` (Python only)
    is a `Model` that replaces the judge the candidates file or --judge names.

    Args:
        candidates: Candidates YAML: models (any reference) with generation settings, system prompt or template,
            price.
        suites: Suites: JSONL files of rows (input, reference, assert, rubric), or eval tasks (YAML or built-in
            name).
        out: Run folder (default <workspace>/compares/NAME, NAME the candidates file's name); a run there resumes.
        require: Constraints for the pick, e.g. "latency_p95_ms<1500", "cost_per_item<=0.001", "qa/pass>=0.8"
            (repeatable).
        prefer: Among candidates as good as the best: the cheapest (cost), the fastest (latency) or the best.
        tolerance: A candidate worse than the best by at most this much counts as as good.
        metric: Quality metric for the pick, as SUITE/METRIC (default: the first suite's first metric).
        judge: Judge model for rubric rows (overrides the candidates file's judge:).
        judge_base_url: OpenAI-compatible server URL for an openai:NAME judge.
        limit: Use the first N items of each suite (0: all).
        cache: SQLite response cache for hosted models, shared with fmkit eval.
        prices: Price table YAML for cost (default: the packaged one; a candidate's price: wins).
        bootstrap: Bootstrap resamples for intervals and paired tests.
        seed: Seed of the bootstrap.
        workspace: Workspace folder: compare runs, the registry, and bare model names.
    """
    started = time.time()
    if limit < 0 or bootstrap < 100 or tolerance < 0:
        raise FmkitError("--limit must be 0 or more, --bootstrap at least 100 and --tolerance 0 or more")
    cands = load_candidates(candidates)
    loaded = load_suites(suites, limit)   # every suite is checked before a model is loaded
    if not loaded:
        raise FmkitError("name at least one suite: a JSONL file of rows or an eval task")
    names = [s.name for s in loaded]
    if len(set(names)) != len(names):
        raise FmkitError(f"two suites are both named '{next(n for n in names if names.count(n) > 1)}'; rename one")
    rubric = next(((s, i) for s in loaded if not s.is_task for i in s.items if i.rubric), None)
    judge_spec = {"model": judge, "base_url": judge_base_url} if judge else cands.judge
    if rubric and judge_model is None and not judge_spec:
        raise FmkitError(f"{rubric[0].source}:{rubric[1].line}: the row has a rubric but there is no judge; set "
                         f"judge: {{model: ...}} in {candidates} or pass --judge")
    ws = Workspace(workspace)
    run_dir = Path(out) if out else ws.path("compares", Path(candidates).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"candidates": [asdict(c) for c in cands.candidates], "suites": [s.source for s in loaded],
              "require": require or [], "prefer": prefer, "tolerance": tolerance, "metric": metric, "limit": limit}
    run_id = ws.start_run("compare", config)
    try:
        results = _run(cands, loaded, run_dir, ws, cache, prices, judge_model, judge_spec, rubric, require or [],
                       prefer, tolerance, metric, bootstrap, seed, workspace)
    except BaseException as e:
        ws.finish_run(run_id, "failed", error=f"{type(e).__name__}: {e}"[:500])
        raise
    results["seconds"] = round(time.time() - started, 2)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    from .report import print_table, write_html

    write_html(results, _read_samples(run_dir), run_dir / "report.html")
    parents = [s["model"].get("id", "") for s in results["candidates"].values()]
    art = ws.add_artifact("compare", run_dir, {"candidates": list(results["candidates"]), "suites": names,
                                               "pick": results["pick"]["candidate"]}, parents=parents)
    write_manifest(run_dir, {"kind": "compare", "id": art, "candidates": list(results["candidates"]),
                             "suites": names})
    ws.finish_run(run_id, outputs=[art])
    print_table(results)
    return results


def _run(cands, loaded, run_dir, ws, cache, prices, judge_model, judge_spec, rubric, require, prefer, tolerance,
         metric, bootstrap, seed, workspace) -> dict:
    store = Store(run_dir / "answers.jsonl")
    answers = {s.name: {} for s in loaded if not s.is_task}
    records = {c.name: [] for c in cands.candidates}
    described = {}
    total = len(cands.candidates) * sum(len(s.items) if not s.is_task else 0 for s in loaded)
    with progress_bar("compare", unit="items") as bar:
        task = bar.add_task("asking", total=total or None)
        for c in cands.candidates:
            opener = _Opener(c, workspace, cache, prices)
            for s in loaded:
                bar.update(task, description=f"{c.name} on {s.name}")
                status(f"compare: {c.name} on {s.name}")
                if s.is_task:
                    rows = run_task(c, opener, s, run_dir / "evals" / c.name / s.name, workspace)
                    records[c.name] += [{"candidate": c.name, "suite": s.name, **r} for r in rows]
                else:
                    answers[s.name][c.name] = ask_rows(c, opener, s, store, lambda: bar.advance(task))
            described[c.name] = opener.described or {"reference": c.model}
            del opener
            gc.collect()   # one local model in memory at a time
    judge = judge_model
    if rubric and judge is None:
        judge = open_judge(judge_spec, cache)
    prefs = {}
    for s in loaded:
        if s.is_task:
            continue
        status(f"compare: scoring {s.name}")
        recs, p = score_rows(s, answers[s.name], store, judge)
        for name, rows in recs.items():
            records[name] += rows
        for pair, by_id in p.items():
            prefs.setdefault(pair, {}).update({(s.name, i): v for i, v in by_id.items()})
    metrics = [f"{s.name}/{m}" for s in loaded for m in s.metrics()]
    metrics = [m for m in metrics if any(f"{r['suite']}/{k}" == m for rs in records.values() for r in rs
                                         for k in r["scores"])]
    with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for rs in records.values():
            for r in rs:
                f.write(json.dumps(r, default=str, ensure_ascii=False) + "\n")
    summaries = {c.name: {"model": described[c.name], "reference": c.model, **summarise(records[c.name], metrics,
                                                                                          bootstrap, seed)}
                 for c in cands.candidates}
    tests = pairwise(records, prefs, metrics, bootstrap, seed)
    primary = metric or (metrics[0] if metrics else "")
    if not primary:
        raise FmkitError("the suites give no metric to compare on: add assert, reference or rubric to the rows")
    chosen = P.choose(summaries, tests, primary, require, prefer, tolerance)
    return {"format": "fmkit.compare/1", "run": str(run_dir), "candidates_file": cands.source,
            "suites": {s.name: {"source": s.source, "type": s.task.type if s.is_task else "rows",
                                "items": len(s.items) if not s.is_task else
                                sum(1 for r in records[cands.candidates[0].name] if r["suite"] == s.name)}
                       for s in loaded},
            "metrics": metrics, "candidates": summaries, "tests": tests, "pick": chosen,
            "pareto": P.pareto(summaries, primary),
            "stats": {"alpha": 0.05, "power": 0.8, "bootstrap": bootstrap, "seed": seed,
                      "correction": "holm over all pairs and metrics"},
            "created": time.strftime("%Y%m%d-%H%M%S")}


def _read_samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
