"""`fmkit monitor`: watch a chosen model for changes. `init` fixes a canary set and the settings, `run` (from cron)
asks the model the canaries and tests the answers against the baseline runs, `report` shows the runs and alerts.

The first `baseline_runs` runs are the baseline. Every later run gets three tests (drift.py), each an exact
p-value: log-probability tracking on fixed prompts (where the API returns log-probabilities), MMD with a string
kernel on sampled outputs, and McNemar on task scores (canaries with a reference or assertions). A CUSUM per test
over the runs' p-values raises the alert, at a level that keeps the chance of any false alarm over `horizon` runs
below `alpha`. An alert names the tests, the prompts that moved most and the scores, and goes to stdout, a JSON
line in a file and a webhook.
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

from ..errors import FmkitError
from ..progress import console, report
from ..workspace import default_root
from . import drift
from .assertions import REFUSAL, normalise, parse_check, python_key, python_program, run_check, run_python
from .monitor_store import MonitorStore
from .probe import observe
from .suite import Item, load_suite

TESTS = ("logprob", "mmd", "mcnemar")
NAMED_PROMPTS = 5      # an alert names at most this many prompts per test


def store_of(workspace) -> MonitorStore:
    return MonitorStore(Path(workspace or default_root()) / "monitor" / "monitor.db")


def monitor_init(name: str, model: str = "", suite: str = "", samples: int = 8, temperature: float = 0.7,
                 max_tokens: int = 64, baseline_runs: int = 5, alpha: float = 0.01, horizon: int = 365,
                 permutations: int = 9999, kernel: Literal["ngram", "hamming"] = "ngram",
                 endpoint: Literal["chat", "completions"] = "chat", logprobs: bool = True, base_url: str = "",
                 webhook: str = "", alert_file: str = "", seed: int = 0, concurrency: int = 4,
                 replace: bool = False, workspace: str | Path | None = None) -> dict:
    """Create a monitor: a fixed canary set, the model it watches and how each run asks and tests.

    The suite's rows are copied into the monitor, so later edits to the file do not change what is asked.

    Args:
        name: The monitor's name (letters, digits, . _ -).
        model: The model to watch: openai:NAME (with --base-url for any OpenAI-compatible server), anthropic:NAME,
            or a local model or adapter folder.
        suite: JSONL canaries, one {"input": text or messages, "reference": ..., "assert": [...]} per line.
        samples: Sampled outputs per canary per run.
        temperature: Sampling temperature of those outputs.
        max_tokens: Most tokens per sampled output.
        baseline_runs: How many first runs make the baseline the later ones are tested against.
        alpha: Chance of any false alarm, all tests together, over --horizon runs of an unchanged model.
        horizon: Runs the false-alarm bound covers (365: a year of daily runs).
        permutations: Random relabellings per permutation test (fixed seed; the smallest p-value is 1/(N+1)).
        kernel: String kernel of the MMD test: ngram (character 3-grams) or hamming (positionwise characters).
        endpoint: Where text canaries go: chat, or completions (which also scores the fixed text's own tokens).
        logprobs: Track log-probabilities of fixed prompts where the API returns them.
        base_url: Base URL of an OpenAI-compatible API (e.g. http://localhost:8000/v1).
        webhook: URL that each alert is POSTed to as JSON.
        alert_file: File each alert is appended to as a JSON line (default <workspace>/monitor/alerts.jsonl).
        seed: Seed for the requests' sampling seeds and the permutation tests.
        concurrency: Requests in flight at once.
        replace: Start over an existing monitor of this name (its runs and alerts are deleted).
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).

    Returns {monitor, database, canaries, settings}.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name or ""):
        raise FmkitError(f"monitor name {name!r} may hold only letters, digits, '.', '_' and '-'")
    if not model or not suite:   # options, as a monitor reads best: `init NAME --model REF --suite FILE`
        raise FmkitError(f"monitor init needs --{'model REF' if not model else 'suite FILE'}")
    if not str(suite).endswith(".jsonl"):
        raise FmkitError(f"--suite {suite} must be a .jsonl file of canaries")
    for value, flag, ok in ((samples, "--samples", samples >= 1), (horizon, "--horizon", horizon >= 1),
                            (baseline_runs, "--baseline-runs", baseline_runs >= 1),
                            (permutations, "--permutations", permutations >= 19),
                            (concurrency, "--concurrency", concurrency >= 1), (alpha, "--alpha", 0 < alpha < 1),
                            (temperature, "--temperature", 0 <= temperature <= 2),
                            (max_tokens, "--max-tokens", max_tokens >= 1)):
        if not ok:
            raise FmkitError(f"{flag} {value} is out of range")
    from ..models.reference import resolve

    ref = resolve(model, None, workspace)
    items = load_suite(str(suite)).items
    # a local folder by its absolute path, so that cron runs from any directory find it
    settings = {"model": str(ref.path.resolve()) if ref.path is not None else model,
                "suite": str(Path(suite).resolve()), "samples": samples, "temperature": temperature,
                "max_tokens": max_tokens, "baseline_runs": baseline_runs, "alpha": alpha, "horizon": horizon,
                "permutations": permutations, "kernel": kernel, "endpoint": endpoint, "logprobs": logprobs,
                "base_url": base_url, "webhook": webhook, "alert_file": alert_file, "seed": seed,
                "concurrency": concurrency}
    rows = [{"id": i.id, "input": i.input, "line": i.line, "reference": i.reference, "raw": i.raw} for i in items]
    store = store_of(workspace)
    try:
        if not store.create(name, settings, rows, replace):
            raise FmkitError(f"monitor {name} already exists in {store.path}; pass --replace to start it over")
        return {"monitor": name, "database": str(store.path), "canaries": len(rows), "settings": settings}
    finally:
        store.close()


def monitor_run(name: str, base_url: str = "", api_key: str = "", workspace: str | Path | None = None) -> dict:
    """Ask the model the monitor's canaries, store the run and test it against the baseline runs.

    Exit status 1 when the run raises an alert (printed, appended to the alert file, POSTed to the webhook), 0
    otherwise; the first --baseline-runs runs only collect the baseline.

    Args:
        name: The monitor (made by `fmkit monitor init`).
        base_url: Ask this OpenAI-compatible URL instead of the monitor's own, for this run.
        api_key: API key (default $OPENAI_API_KEY or $ANTHROPIC_API_KEY).
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).

    Returns {monitor, run, baseline, alert, tests, summary, details (the alert, when there is one), database}.
    """
    store = store_of(workspace)
    try:
        found = store.monitor(name)
        if found is None:
            known = ", ".join(store.names()) or "none yet"
            raise FmkitError(f"no monitor named {name} in {store.path} (monitors: {known}); create it with "
                             f"`fmkit monitor init {name} --model REF --suite FILE`")
        settings, rows = found
        items = [Item(r["id"], r["input"], r["line"], r["reference"],
                      [parse_check(c, f"{settings['suite']}:{r['line']}") for c in r["raw"].get("assert", [])],
                      r["raw"].get("rubric", ""), r["raw"].get("vars", {}), r["raw"]) for r in rows]
        number, started = store.next_number(name), time.time()
        seen = observe(settings["model"], items, settings, number, base_url or settings["base_url"], api_key,
                       workspace)
        outputs, summary = scored(items, seen)
        baseline = number <= settings["baseline_runs"]
        tests, details = ({}, None) if baseline else tested(store, name, settings, items, number, seen, outputs,
                                                            summary)
        run = {"number": number, "started": started, "seconds": round(time.time() - started, 3),
               "baseline": baseline, "alert": details is not None, "summary": summary, "tests": tests,
               "meta": {"model": settings["model"], "base_url": base_url or settings["base_url"],
                        "headers": seen.headers}}
        store.add_run(name, run, [(c, j, t, f, s, r) for c, j, t, f, s, r in outputs],
                      {c: a.logprobs for c, a in enumerate(seen.answers) if a.logprobs})
        if details is not None:
            store.add_alert(name, number, details, deliver(details, settings, store.path.parent))
        result = {"monitor": name, "run": number, "baseline": baseline, "alert": details is not None,
                  "baseline_runs": settings["baseline_runs"], "tests": tests, "summary": summary,
                  "details": details, "database": str(store.path),
                  "exit_code": 1 if details is not None else 0}   # the command's status: cron reads it
    finally:
        store.close()
    return result


# ---- scoring one run ------------------------------------------------------------------------------------------
def scored(items: list[Item], seen) -> tuple[list[tuple], dict]:
    """Rows (canary, sample, text, finish, score, refused) and the run's summary (refusal rate, lengths, task
    score, what the API said about itself). A score is 1/0 for canaries with a reference or assertions: the
    normalised reference occurs in the output and no assertion fails; None for the others."""
    jobs = {python_key(c, t, i.raw): (python_program(c, t, i.raw), c.options.get("timeout_s", 10))
            for i, a in zip(items, seen.answers) for t in a.texts for c in i.checks if c.kind == "python"}
    verdicts = run_python(jobs) if jobs else {}
    rows, per_canary = [], []
    for c, (item, a) in enumerate(zip(items, seen.answers)):
        scores = []
        for j, (text, finish) in enumerate(zip(a.texts, a.finish)):
            score = None
            if item.reference is not None or item.checks:
                answer = {"output": text, "completion_tokens": a.tokens / max(1, len(a.texts))}
                ok = item.reference is None or normalise(item.reference) in normalise(text)
                ok = ok and all(run_check(k, answer, verdicts, item.raw)["passed"] is not False for k in item.checks)
                score = float(ok)
                scores.append(score)
            rows.append((c, j, text, finish, score, int(bool(REFUSAL.search(text)))))
        per_canary.append(sum(scores) / len(scores) if scores else None)
    texts = [r[2] for r in rows]
    known = [s for s in per_canary if s is not None]
    summary = {"samples": len(texts), "refusal_rate": sum(r[5] for r in rows) / max(1, len(rows)),
               "mean_chars": sum(map(len, texts)) / max(1, len(texts)),
               "tokens_per_sample": sum(a.tokens for a in seen.answers) / max(1, len(texts)),
               "score": sum(known) / len(known) if known else None, "scores": per_canary,
               "logprob_prompts": sum(a.logprobs is not None for a in seen.answers),
               "logprob_notes": sorted({a.logprob_note for a in seen.answers if a.logprob_note}),
               "fingerprints": dict(seen.fingerprints), "served_as": dict(seen.served_as)}
    return rows, summary


# ---- testing one run against the baseline ---------------------------------------------------------------------
def tested(store: MonitorStore, name: str, settings: dict, items: list[Item], number: int, seen, outputs: list,
           summary: dict) -> tuple[dict, dict | None]:
    """The three tests and their CUSUMs for run `number`; (tests, the alert or None)."""
    base = list(range(1, settings["baseline_runs"] + 1))
    old, old_lp = store.outputs(name, base), store.logprobs(name, base)
    n, perms, seed = len(items), settings["permutations"], settings["seed"] * 100_003 + number
    new_texts = {c: [] for c in range(n)}
    for c, _, text, *_ in outputs:
        new_texts[c].append(text)
    results = [
        drift.logprob_test([([old_lp[b][c] for b in base if c in old_lp[b]],
                             [seen.answers[c].logprobs] if seen.answers[c].logprobs else []) for c in range(n)],
                           perms, seed),
        drift.mmd_test([([t for b in base for _, t, _, _ in old[b].get(c, [])], new_texts[c]) for c in range(n)],
                       settings["kernel"], perms, seed),
    ]
    paired = base[(number - len(base) - 1) % len(base)]   # each baseline run in turn, so pairs stay independent
    mine = {(c, j): s for c, j, _, _, s, _ in outputs if s is not None}
    results.append(drift.task_test([(c, s, mine[c, j]) for c in range(n) for j, _, s, _ in old[paired].get(c, [])
                                    if s is not None and (c, j) in mine]))
    previous = store.runs(name)[-1]["tests"] if number > len(base) + 1 else {}
    h = drift.threshold(settings["alpha"], settings["horizon"], len(TESTS))
    tests = {}
    for r in results:
        before = previous.get(r.test, {}).get("cusum", 0.0)
        skipped = "skipped" in r.detail
        cusum = before if skipped else drift.cusum_step(before, r.p_value)
        tests[r.test] = {"p_value": None if skipped else r.p_value, "statistic": r.statistic, "cusum": cusum,
                         "threshold": h, "alarm": cusum >= h, "prompts": r.prompts, **r.detail}
    if not any(t["alarm"] for t in tests.values()):
        return tests, None
    return tests, alert_of(name, settings, items, number, tests, summary, store.runs(name)[:len(base)])


def alert_of(name: str, settings: dict, items: list[Item], number: int, tests: dict, summary: dict,
             baseline: list[dict]) -> dict:
    """What changed: the tests that alarmed, the prompts that moved most under each, and the scores."""
    def mean(key):
        values = [r["summary"][key] for r in baseline if r["summary"].get(key) is not None]
        return sum(values) / len(values) if values else None

    def short(item) -> str:
        text = item.input if isinstance(item.input, str) else item.input[-1]["content"]
        return text if len(text) <= 60 else text[:57] + "..."

    moved = {}
    for t, r in tests.items():
        if r["alarm"] and r["prompts"]:
            # the prompts with the strongest evidence (within 2x of the smallest p-value), largest effect first:
            # Monte Carlo noise in p-values alone would order prompts that moved equally at random
            effects, least = r.get("effects", {}), min(r["prompts"].values())
            strong = [c for c, p in r["prompts"].items() if p <= 2 * least and p < 1.0]
            strong.sort(key=lambda c: -effects.get(c, 0.0))
            moved[t] = [{"canary": items[c].id, "input": short(items[c]), "p_value": r["prompts"][c],
                         **({"effect": effects[c]} if c in effects else {})} for c in strong[:NAMED_PROMPTS]]
    scores = {k: {"baseline": mean(k), "now": summary[k]} for k in ("score", "refusal_rate", "mean_chars",
                                                                     "tokens_per_sample")}
    fps = sorted({f for r in baseline for f in r["summary"]["fingerprints"]})
    details = {"monitor": name, "run": number, "model": settings["model"], "at": time.time(),
               "tests": {t: {k: r[k] for k in ("p_value", "cusum", "threshold")} for t, r in tests.items()
                         if r["alarm"]},
               "prompts": moved, "scores": scores,
               "fingerprints": {"baseline": fps, "now": sorted(summary["fingerprints"])}}
    details["message"] = message_of(details, tests)
    return details


def message_of(d: dict, tests: dict) -> str:
    lines = [f"fmkit monitor {d['monitor']}: run {d['run']} of {d['model']} differs from its baseline"]
    for t, r in d["tests"].items():
        lines.append(f"  {t}: p = {r['p_value']:.3g} this run, CUSUM {r['cusum']:.2f} >= {r['threshold']:.2f}")
        for p in d["prompts"].get(t, []):
            effect = f", effect {p['effect']:.3g}" if "effect" in p else ""
            lines.append(f"    canary {p['canary']} ({p['input']!r}): p = {p['p_value']:.3g}{effect}")
    for k, v in d["scores"].items():
        if v["now"] is not None and v["baseline"] is not None:
            extra = f" (McNemar p = {tests['mcnemar']['p_value']:.3g})" if k == "score" and \
                tests.get("mcnemar", {}).get("p_value") is not None else ""
            lines.append(f"  {k}: {v['baseline']:.3g} -> {v['now']:.3g}{extra}")
    fp = d["fingerprints"]
    if fp["now"] != fp["baseline"]:
        lines.append(f"  system_fingerprint: {', '.join(fp['baseline']) or '-'} -> {', '.join(fp['now']) or '-'}")
    return "\n".join(lines)


# ---- alerts ---------------------------------------------------------------------------------------------------
def deliver(details: dict, settings: dict, folder: Path) -> dict:
    """Append the alert to the alert file and POST it to the webhook; {file, webhook} says how each went (a
    webhook that fails is reported, and the run still counts)."""
    path = Path(settings["alert_file"] or folder / "alerts.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(details, default=str) + "\n")
    done = {"file": str(path), "webhook": None}
    if settings["webhook"]:
        req = urllib.request.Request(settings["webhook"], data=json.dumps(details, default=str).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                done["webhook"] = r.status
        except (urllib.error.URLError, OSError) as e:
            done["webhook"] = f"failed: {getattr(e, 'reason', e)}"
            console.print(f"warning: the alert could not be POSTed to {settings['webhook']}: {done['webhook']}")
    return done


def show_run(result: dict, kw=None) -> None:
    """How the command line shows a run: the alert on stdout, else a status line on stderr."""
    if result["alert"]:
        report.print(result["details"]["message"], highlight=False, markup=False, soft_wrap=True)
    elif result["baseline"]:
        console.print(f"monitor {result['monitor']}: baseline run {result['run']} of {result['baseline_runs']} "
                      "stored", highlight=False, soft_wrap=True)
    else:
        ps = ", ".join(f"{t} p={r['p_value']:.3g}" for t, r in result["tests"].items() if r["p_value"] is not None)
        console.print(f"monitor {result['monitor']}: run {result['run']} is consistent with the baseline ({ps})",
                      highlight=False, soft_wrap=True)


def monitor_report(name: str, workspace: str | Path | None = None) -> dict:
    """Show a monitor's runs (scores, p-values, CUSUMs, fingerprints) and its alerts.

    Args:
        name: The monitor (made by `fmkit monitor init`).
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).

    Returns {monitor, settings, canaries, runs, alerts, database}.
    """
    store = store_of(workspace)
    try:
        found = store.monitor(name)
        if found is None:
            raise FmkitError(f"no monitor named {name} in {store.path} (monitors: "
                             f"{', '.join(store.names()) or 'none yet'})")
        runs, alerts = store.runs(name), store.alerts(name)
        result = {"monitor": name, "settings": found[0], "canaries": len(found[1]), "runs": runs, "alerts": alerts,
                  "database": str(store.path)}
    finally:
        store.close()
    return result


def show_report(result: dict, kw=None) -> None:
    """How the command line shows a monitor's report: its runs and alerts as tables."""
    from rich.table import Table

    table = Table(title=f"monitor {result['monitor']}: {result['settings']['model']}, {result['canaries']} "
                        f"canaries, {len(result['runs'])} runs")
    for col in ("run", "when", "kind", "score", "refusals", "chars", *TESTS, "fingerprint"):
        table.add_column(col)

    def num(x, fmt=".3g"):
        return "-" if x is None else format(x, fmt)
    for r in result["runs"]:
        s, t = r["summary"], r["tests"]
        cells = [f"p={num(t[k]['p_value'])} S={t[k]['cusum']:.1f}" if k in t else "" for k in TESTS]
        table.add_row(str(r["number"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])),
                      "baseline" if r["baseline"] else ("ALERT" if r["alert"] else "test"), num(s["score"]),
                      num(s["refusal_rate"]), num(s["mean_chars"], ".0f"), *cells,
                      ", ".join(s["fingerprints"]) or "-")
    report.print(table)
    for a in result["alerts"]:
        report.print(a["message"], highlight=False, markup=False, soft_wrap=True)
