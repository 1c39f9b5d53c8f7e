"""`fmkit adapt auto`: the adaptation ladder as one verb.

Rungs run cheapest first: zero-shot, few-shot (nearest training examples), RAG over --docs, LoRA, full fine-tuning,
continued pre-training on --docs. Each is scored by `evaluate` on the same held-out items and compared with the best
rung so far by an exact McNemar test. The verb lives in select/ (not adapt/) because it evaluates: adapt/ sits
below evals/ and may not import it.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import FmkitError
from ..evals import metrics as M
from ..progress import progress_bar, report, status
from ..workspace import Workspace, write_manifest
from . import ladder_rungs as R

ALPHA = 0.05


def parse_target(text: str) -> tuple[str, float] | None:
    """'acc>=0.8' -> ("acc", 0.8); '' -> None."""
    if not text:
        return None
    m = re.fullmatch(r"\s*([A-Za-z_][\w@]*)\s*>=\s*([0-9]*\.?[0-9]+)\s*", text)
    if not m:
        raise FmkitError(f"--target must look like METRIC>=X (e.g. acc>=0.8), got {text!r}")
    return m.group(1), float(m.group(2))


def parse_budget(text: str) -> float:
    """'90s', '20m', '1.5h' or plain seconds -> seconds; '' -> no limit."""
    if not text:
        return float("inf")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise FmkitError(f"--budget must be a time such as 90s, 20m or 1.5h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _scores(run: Path, metric: str) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    missing = [r["id"] for r in rows if metric not in r["scores"]]
    if missing:
        raise FmkitError(f"the task's items have no '{metric}' score (item {missing[0]}); pick a metric it reports")
    return {r["id"]: float(r["scores"][metric]) for r in rows}


def _eval_tokens(run: Path, usage: dict, base: str) -> tuple[int, int]:
    """(prompt, completion) tokens of an eval run: the backend's count for hosted models; for local ones, the
    base tokenizer's count of each prompt with its choices (or output), which local backends do not report."""
    if usage.get("prompt_tokens") or usage.get("completion_tokens"):
        return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    from ..models.io import load_tokenizer

    try:
        tok = load_tokenizer(base)
    except (OSError, ValueError, FmkitError):   # an unusual folder: tokens unknown rather than a failed rung
        return 0, 0
    prompt = completion = 0
    for line in (run / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        n = len(tok(row.get("prompt", ""), add_special_tokens=False)["input_ids"])
        choices = row.get("choices") or []
        prompt += n * max(1, len(choices)) + sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in choices)
        completion += len(tok(row.get("output") or "", add_special_tokens=False)["input_ids"])
    return prompt, completion


def _cost(prompt: int, completion: int, trained: int, price: tuple[float, float]) -> float:
    # training tokens are priced as input tokens: a rough stand-in, hosted fine-tuning prices differ per provider
    return (prompt + trained) / 1e6 * price[0] + completion / 1e6 * price[1]


def adapt_auto(base: str, task: str, train: Path | None = None, docs: Path | None = None, target: str = "",
               budget: str = "", name: str = "", metric: str = "", shots: int = 3, lora_steps: int = 60,
               full_steps: int = 60, pretrain_steps: int = 60, batch_size: int = 8, limit: int = 0,
               base_url: str = "", api_key: str = "", price_as: str = "", prices: Path | None = None, seed: int = 0,
               workspace: str | Path | None = None) -> dict:
    """Climb the adaptation ladder until a target is reached significantly or the budget is spent.

    Rungs, cheapest first: zero-shot, few-shot (the nearest --train examples), RAG over --docs, LoRA, full
    fine-tune, continued pre-training on --docs. Every rung is evaluated on the same held-out task items and
    compared with the best rung so far by an exact McNemar test; a rung becomes the best only when it wins that
    test (p < 0.05), so a costlier rung must earn its place. The target METRIC>=X is reached *significantly* when
    the rung's metric is at least X and the lower end of its 95% Wilson interval is too; the ladder then stops
    and that rung is chosen. The budget is checked before each rung. A remote base (openai:NAME, anthropic:NAME)
    runs the prompting and RAG rungs only. Writes <workspace>/ladders/NAME: results.json, ladder.png (gain vs
    cost) and artifacts/; the chosen artifact is recorded in the registry. Returns the results.

    Args:
        base: Base model reference (a model folder, a workspace model name, hf:ORG/NAME, openai:NAME).
        task: Held-out task: a task YAML or a built-in name (every rung is scored on its items).
        train: Prompt/completion JSONL: few-shot examples and fine-tuning data.
        docs: Folder of domain documents: the RAG index and continued pre-training text.
        target: Stop when METRIC>=X is reached significantly (e.g. acc>=0.8); default: climb every rung.
        budget: Wall-time budget such as 90s, 20m or 1.5h; no rung starts once it is spent.
        name: Ladder name (default BASE-TASK-TIME); the run folder is <workspace>/ladders/NAME.
        metric: Metric to climb when no --target names one (default: the task's first metric).
        shots: Few-shot examples and retrieved chunks per item.
        lora_steps: LoRA optimizer steps.
        full_steps: Full fine-tuning optimizer steps.
        pretrain_steps: Continued pre-training steps.
        batch_size: Training examples per step.
        limit: Evaluate the first N items of the task (0: all).
        base_url: OpenAI-compatible server URL for openai:NAME (e.g. http://localhost:8000/v1).
        api_key: API key for hosted models.
        price_as: Estimate $ at this hosted model's prices (e.g. openai:gpt-4o-mini); default: the base's own.
        prices: Price table YAML (default: the packaged one).
        seed: Seed for training and example order.
        workspace: Workspace folder: the ladder's run folder, the registry, and bare model names.
    """
    from ..evals.runner import evaluate
    from ..evals.tasks import load_items, load_task
    from ..models.reference import REMOTE
    from ..providers.pricing import price_of

    started = time.time()
    goal, seconds = parse_target(target), parse_budget(budget)
    if limit < 0:
        raise FmkitError(f"limit must be 0 (all items) or a positive number of items, got {limit}")
    t = load_task(task)
    if t.type not in ("multiple_choice", "generate_until"):
        raise FmkitError(f"{t.source}: the ladder climbs multiple_choice and generate_until tasks, not {t.type}")
    metric = goal[0] if goal else (metric or t.metrics[0])
    if metric not in t.metrics:
        raise FmkitError(f"{t.source}: metric '{metric}' is not one the task reports ({', '.join(t.metrics)})")
    items = load_items(t)[:limit or None]
    remote = str(base).partition(":")[0] in REMOTE
    for flag, path in (("--train", train), ("--docs", docs)):
        if path is not None and not Path(path).exists():
            raise FmkitError(f"{flag} {path} does not exist")
    ws = Workspace(workspace)
    name = name or re.sub(r"[^\w.-]+", "-", f"{Path(str(base)).name}-{t.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = ws.path("ladders", name)
    run.mkdir(parents=True, exist_ok=True)
    s = R.Setup(str(base), t, items, Path(train) if train else None, Path(docs) if docs else None, run, workspace,
                shots, lora_steps, full_steps, pretrain_steps, batch_size, seed, remote)
    priced = price_as or (str(base) if remote else "")
    price = price_of(*priced.split(":", 1), table=prices) if ":" in priced else (0.0, 0.0)

    rungs, best, chosen, reached = [], None, None, False
    bar = progress_bar("adapt auto", "rung")
    with bar:
        job = bar.add_task(name, total=len(R.RUNGS))
        for rung_name, build in R.RUNGS:
            bar.update(job, description=rung_name)
            row = {"rung": rung_name}
            spent = time.time() - started
            if reached:
                row.update(status="not run", reason=f"the target {target} was reached on an earlier rung")
            elif spent >= seconds:
                row.update(status="not run", reason=f"budget spent ({spent:.0f}s of {seconds:.0f}s)")
            else:
                status(f"adapt auto: {rung_name} ({spent:.0f}s elapsed)")
                row.update(_climb(s, rung_name, build, evaluate, metric, base_url, api_key, prices, price))
            if row["status"] == "done":
                ids = sorted(row.pop("_scores"))
                scores = [row["_by_id"][i] for i in ids]
                if best is not None:
                    ref = [best["_by_id"][i] for i in ids]
                    test = M.mcnemar(ref, scores)
                    row["mcnemar"] = {"vs": best["rung"], "p_value": test["p_value"], "better_here": test["b_only"],
                                      "better_there": test["a_only"]}
                better = best is None or (row["mcnemar"]["p_value"] < ALPHA
                                          and row["mcnemar"]["better_here"] > row["mcnemar"]["better_there"])
                if goal:
                    row["target_reached"] = row["value"] >= goal[1] and row["ci"][0] >= goal[1]
                    reached = row["target_reached"]
                if better or reached:
                    best = row
            rungs.append(row)
            bar.advance(job)
    chosen = best
    for row in rungs:
        row.pop("_by_id", None)
    doc = {"format": "fmkit.ladder/1", "name": name, "base": str(base), "remote": remote, "task": t.task,
           "task_source": t.source, "items": len(items), "metric": metric, "target": target or None,
           "target_definition": "metric >= X and the lower end of its 95% Wilson interval >= X",
           "target_reached": reached, "budget_s": None if seconds == float("inf") else seconds,
           "price_as": priced or None, "alpha": ALPHA, "seconds": round(time.time() - started, 2),
           "chosen": None, "rungs": rungs}
    if chosen is not None:
        # the rung's own verb may have recorded the artifact already: keep its meta, add the ladder's naming
        path = str(Path(chosen["artifact"]).resolve())
        known = next((a for a in ws.artifacts() if a["path"] == path), {"kind": chosen["kind"], "meta": {}})
        art = ws.add_artifact(known["kind"], path, {**known["meta"], "name": f"{name}-chosen", "ladder": name,
                                                    "rung": chosen["rung"], "metric": metric,
                                                    "value": chosen["value"]})
        doc["chosen"] = {"rung": chosen["rung"], "kind": chosen["kind"], "artifact": chosen["artifact"], "id": art,
                         "name": f"{name}-chosen"}
    doc["plot"] = str(plot(rungs, metric, run / "ladder.png", goal))
    (run / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    ladder_id = ws.add_artifact("ladder", run, {"name": name, "task": t.task, "metric": metric,
                                                "chosen": (doc["chosen"] or {}).get("rung")})
    write_manifest(run, {"kind": "ladder", "id": ladder_id, "base": str(base), "task": t.task})
    ws.close()
    report.print(table(doc), highlight=False, soft_wrap=True)
    doc["run"] = str(run)
    return doc


def _climb(s: R.Setup, rung_name: str, build, evaluate, metric: str, base_url: str, api_key: str,
           prices: Path | None, price: tuple[float, float]) -> dict:
    """Build and evaluate one rung; a skip or a failure comes back as a row with its reason."""
    t0 = time.time()
    try:
        built = build(s)
        out = evaluate(built.model, [str(built.task)], out=s.run / "evals" / rung_name.replace(" ", "-"),
                       base_url=base_url if s.remote else "", api_key=api_key, prices=prices,
                       contamination=False, workspace=s.workspace)
    except R.Skip as e:
        return {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one rung failing must not lose the others' results: its reason is kept
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}", "wall_s": round(time.time() - t0, 2)}
    res = json.loads((out / "results.json").read_text())
    task_res = next(iter(res["results"].values()))
    by_id = _scores(out, metric)
    if any(v not in (0.0, 1.0) for v in by_id.values()):
        raise FmkitError(f"metric '{metric}' is not scored 0/1 per item; McNemar needs a pass/fail metric")
    k, n = int(sum(by_id.values())), len(by_id)
    prompt, completion = _eval_tokens(out, res.get("usage", {}), built.model if not s.remote else "")
    trained = s.training_tokens.get(rung_name, 0)
    return {"status": "done", "detail": built.detail, "value": k / n, "ci": list(M.wilson(k, n)), "k": k, "n": n,
            "stderr": task_res["metrics"][metric]["stderr"], "wall_s": round(time.time() - t0, 2),
            "tokens": {"eval_prompt": prompt, "eval_completion": completion, "training": trained},
            "cost_usd": round(_cost(prompt, completion, trained, price), 6), "artifact": str(built.artifact),
            "kind": built.kind, "eval_run": str(out), "_scores": list(by_id), "_by_id": by_id}


def table(doc: dict) -> str:
    """The ladder as a markdown table: one row per rung, skipped and failed rungs with their reasons."""
    head = f"ladder {doc['name']}: {doc['base']} on {doc['task']} ({doc['items']} items), metric {doc['metric']}"
    lines = [head + (f", target {doc['target']}" if doc["target"] else ""),
             "", f"| rung | {doc['metric']} [95% CI] | McNemar p vs best so far | wall s | tokens | est. $ | note |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rungs"]:
        if r["status"] != "done":
            wall = r.get("wall_s", "—")
            lines.append(f"| {r['rung']} | — | — | {wall} | — | — | {r['status']}: {r['reason']} |")
            continue
        mc = r.get("mcnemar")
        test = f"{mc['p_value']:.2g} vs {mc['vs']} ({mc['better_here']} / {mc['better_there']})" if mc else "—"
        tokens = sum(r["tokens"].values())
        note = r["detail"] + ("; target reached" if r.get("target_reached") else "")
        lines.append(f"| {r['rung']} | {r['value']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {test} | "
                     f"{r['wall_s']:.1f} | {tokens:,} | {r['cost_usd']:.3g} | {note} |")
    chosen = doc["chosen"]
    lines += ["", f"chosen: {chosen['rung']} -> {chosen['artifact']} (registry {chosen['name']})" if chosen
              else "chosen: none (no rung was evaluated)"]
    return "\n".join(lines)


def plot(rungs: list[dict], metric: str, out: Path, goal: tuple[str, float] | None) -> Path:
    """Gain vs cost: each evaluated rung's metric (with its Wilson interval) against cumulative wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    spent = 0.0
    for r in rungs:
        spent += r.get("wall_s", 0.0) or 0.0
        if r["status"] != "done":
            continue
        ax.errorbar([spent], [r["value"]], yerr=[[r["value"] - r["ci"][0]], [r["ci"][1] - r["value"]]], fmt="o",
                    capsize=3)
        ax.annotate(f"{r['rung']}\n${r['cost_usd']:.3g}, {sum(r['tokens'].values()):,} tok", (spent, r["value"]),
                    textcoords="offset points", xytext=(6, 4 + 22 * (len(ax.texts) % 2)), fontsize=7)
    if goal:
        ax.axhline(goal[1], linestyle="--", color="grey", label=f"target {goal[0]} >= {goal[1]}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(-0.05, 1.1)   # pass/fail rates: the whole range, so rungs are seen against 0 and 1
    ax.set_xlabel("cumulative wall time (s)")
    ax.set_ylabel(f"{metric} (95% Wilson interval)")
    ax.set_title("adaptation ladder: gain vs cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
