"""`fmkit eval`: run tasks against a model; write results.json and samples.jsonl and record the run.

Each metric comes with its standard error, each result with a fingerprint of what decided the prompts and scores,
and, when the model's training data is known, with scores on the clean and contaminated items apart.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import FmkitError
from ..progress import status
from ..providers import GenRequest, Model, get_model
from ..workspace import Workspace, write_manifest
from . import metrics as M
from . import redteam
from .tasks import Renderer, Task, load_items, load_tasks

CODE_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]   # HumanEval's stop sequences


def apply_filters(text: str, filters: list) -> str:
    """lm-eval style filter chain over one generation: regex (group, select first|last), strip, lowercase."""
    for f in filters:
        if "regex" in f:
            found = re.findall(f["regex"], text)
            if not found:
                text = f.get("fallback", "[invalid]")
                continue
            pick = found[-1] if f.get("select", "first") == "last" else found[0]
            if isinstance(pick, tuple):
                group = int(f.get("group", 1)) - 1
                pick = pick[group] if 0 <= group < len(pick) else pick[0]
            text = pick
        if f.get("strip"):
            text = text.strip()
        if f.get("lowercase"):
            text = text.lower()
    return text


def _mc(model: Model, task: Task, r: Renderer, items, pool, batch_size: int) -> list[dict]:
    rows, requests, spans = [], [], []
    need_mi = "acc_mutual_info" in task.metrics
    for n, item in enumerate(items):
        prefix, shots = r.fewshot(items, pool, n if pool is items else None)
        text = r.text(item, n)
        choices = r.choices(item, n)
        gold = r.target(item, n, choices)
        ctx = prefix + text
        start = len(requests)
        requests += [(ctx, task.target_delimiter + c) for c in choices]
        if need_mi:
            requests += [("", task.target_delimiter + c) for c in choices]
        spans.append((start, len(choices)))
        rows.append({"prompt": ctx, "choices": choices, "target": gold, "fewshot": shots, "_text": text})
    if task.scoring == "generate" or "loglikelihood" not in model.capabilities:
        if task.scoring != "generate":
            raise model.unsupported("loglikelihood")
        return _mc_by_generation(model, task, rows)
    results = model.loglikelihood(requests)
    for row, (start, k) in zip(rows, spans):
        res = results[start:start + k]
        unc = [x[0] for x in results[start + k:start + 2 * k]] if need_mi else None
        row["loglikelihoods"] = [x[0] for x in res]
        row["scores"] = M.mc_scores([x[0] for x in res], row["choices"], row["target"], [x[2] for x in res],
                                    [x[1] for x in res], unc)
    return rows


def _mc_by_generation(model: Model, task: Task, rows: list[dict]) -> list[dict]:
    """Multiple choice for models without log-likelihoods: list lettered options, parse the letter answered."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    reqs = []
    for row in rows:
        opts = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(row["choices"]))
        prompt = f"{row['prompt']}\n{opts}\nAnswer with the letter of the correct option only.\nAnswer:"
        reqs.append(GenRequest(prompt, ["\n"], 8, 0.0))
    outs = model.chat(reqs) if task.chat or "generate" not in model.capabilities else model.generate(reqs)
    for row, out in zip(rows, outs):
        m = re.search(r"\b([A-Z])\b", out.strip().upper())
        pick = letters.index(m.group(1)) if m and letters.index(m.group(1)) < len(row["choices"]) else -1
        row["output"] = out
        row["scores"] = {"acc": float(pick == row["target"]), "unparsable": float(pick < 0)}
    return rows


def _gen(model: Model, task: Task, r: Renderer, items, pool) -> list[dict]:
    g = {"until": ["\n\n"], "max_tokens": 256, "temperature": 0.0, **task.generation}
    rows, reqs = [], []
    for n, item in enumerate(items):
        prefix, shots = r.fewshot(items, pool, n if pool is items else None)
        text = r.text(item, n)
        prompt = prefix + text
        rows.append({"prompt": prompt, "target": r.target(item, n), "fewshot": shots, "_text": text})
        reqs.append(GenRequest([{"role": "user", "content": prompt}] if task.chat else prompt, list(g["until"]),
                               int(g["max_tokens"]), float(g["temperature"])))
    outs = model.chat(reqs) if task.chat else model.generate(reqs)
    em = task.exact_match
    for row, out in zip(rows, outs):
        row["output"] = out
        row["filtered"] = apply_filters(out, task.filters)
        row["scores"] = {"exact_match": M.exact_match(row["filtered"], row["target"], bool(em.get("ignore_case")),
                                                      bool(em.get("ignore_punctuation")),
                                                      em.get("regexes_to_ignore", []))}
    return rows


def _code(model: Model, task: Task, r: Renderer, items) -> list[dict]:
    from jinja2 import Environment, StrictUndefined

    from ..sandbox import Limits, run_many

    c = {"samples": 1, "k": [1], "temperature": None, "until": CODE_STOPS, "max_tokens": 384, "timeout": 10.0,
         "program": "{{prompt}}{{completion}}\n\n{{test}}\n\ncheck({{entry_point}})\n", **task.code}
    n = int(c["samples"])
    temp = float(c["temperature"]) if c["temperature"] is not None else (0.0 if n == 1 else 0.8)
    program = Environment(undefined=StrictUndefined, keep_trailing_newline=True).from_string(c["program"])
    reqs, rows = [], []
    for i, item in enumerate(items):
        prompt = r.text(item, i)
        rows.append({"prompt": prompt, "_text": prompt, "target": ""})
        reqs += [GenRequest(prompt, list(c["until"]), int(c["max_tokens"]), temp, seed=s) for s in range(n)]
    outs = model.generate(reqs) if "completion" not in task.code else None
    programs = []
    for i, (item, row) in enumerate(zip(items, rows)):
        comps = [item[task.code["completion"]]] * n if outs is None else outs[i * n:(i + 1) * n]
        row["completions"] = comps
        programs += [program.render(**{**item, "prompt": row["prompt"], "completion": comp}) for comp in comps]
    results = run_many(programs, Limits(timeout=float(c["timeout"])))
    for i, row in enumerate(rows):
        res = results[i * n:(i + 1) * n]
        passed = sum(x.status == "passed" for x in res)
        row["results"] = [{"status": x.status, "reason": x.reason} for x in res]
        row["scores"] = {f"pass@{k}": M.pass_at_k(n, passed, int(k)) for k in c["k"] if int(k) <= n}
    return rows


def _judge(model: Model, task: Task, r: Renderer, items, judge: Model | None) -> list[dict]:
    from .judge import grade_pairwise, grade_single

    j = {"mode": "single", "max_tokens": 512, **task.judge}
    judge = judge or get_model(str(j["model"]), base_url=j.get("base_url", ""), api_key=j.get("api_key", ""))
    g = {"until": [], "max_tokens": 256, "temperature": 0.0, **task.generation}
    questions = [r.text(item, n) for n, item in enumerate(items)]
    reqs = [GenRequest([{"role": "user", "content": q}] if task.chat else q, list(g["until"]), int(g["max_tokens"]),
                       float(g["temperature"])) for q in questions]
    answers = model.chat(reqs) if task.chat else model.generate(reqs)
    rows = [{"prompt": q, "_text": q, "target": "", "output": a} for q, a in zip(questions, answers)]
    if j["mode"] == "single":
        for row, g1 in zip(rows, grade_single(judge, questions, answers, j["max_tokens"])):
            row["judgement"] = g1["judgement"]
            row["scores"] = {} if g1["rating"] is None else {"rating": g1["rating"]}
            row["unparsable"] = g1["rating"] is None
    else:
        base = [str(item[j["baseline"]]) for item in items]
        for row, g2, b in zip(rows, grade_pairwise(judge, questions, answers, base, j["max_tokens"]), base):
            row.update(baseline=b, judgements=g2["judgements"], verdicts=g2["verdicts"], unparsable=g2["unparsable"])
            row["scores"] = {f"{o}_rate": float(g2["outcome"] == o) for o in ("win", "tie", "loss")}
    return rows


def _ppl(model: Model, task: Task, r: Renderer, items) -> list[dict]:
    texts = [r.text(item, n) for n, item in enumerate(items)]
    res = model.loglikelihood_rolling(texts)
    return [{"prompt": t[:200], "_text": t, "target": "", "ll": ll, "tokens": ntok, "words": len(t.split()),
             "bytes": len(t.encode()), "scores": {}} for t, (ll, ntok) in zip(texts, res)]


def _perturbed(model: Model, task: Task, items, pool, batch_size: int, rows: list[dict]) -> dict:
    """Worst case per item over perturbed inputs (HELM robustness and fairness), as `<metric>_robust/_fair`."""
    from .perturb import FAIRNESS, ROBUSTNESS

    out = {}
    if task.type not in ("multiple_choice", "generate_until"):
        return out
    primary = "acc" if task.type == "multiple_choice" else "exact_match"
    for kind, names, table in (("robust", task.robustness, ROBUSTNESS), ("fair", task.fairness, FAIRNESS)):
        if not names:
            continue
        unknown = [n for n in names if n not in table]
        if unknown:
            raise FmkitError(f"{task.source}: unknown {'robustness' if kind == 'robust' else 'fairness'} "
                             f"perturbation '{unknown[0]}' (known: {', '.join(table)})")
        worst = [row["scores"].get(primary, 0.0) for row in rows]
        for name in names:
            r = Renderer(task)
            r.transform = table[name]
            pr = _mc(model, task, r, items, pool, batch_size) if task.type == "multiple_choice" \
                else _gen(model, task, r, items, pool)
            for i, row in enumerate(pr):
                worst[i] = min(worst[i], row["scores"].get(primary, 0.0))
                rows[i].setdefault("perturbed", {})[name] = row["scores"].get(primary)
        for row, w in zip(rows, worst):
            row["scores"][f"{primary}_{kind}"] = w
        out[f"{primary}_{kind}"] = dict(zip(("value", "stderr"), M.mean_stderr(worst)))
    return out


def _toxicity(task: Task, rows: list[dict], extra: dict) -> None:
    """Share of generations the toxicity word list flags (any generation task)."""
    if not rows or "output" not in rows[0]:
        return
    from ..data.toxicity import Toxicity

    tox = Toxicity(min_hits=1, threshold=0.0)
    flags = [float(tox.score(row["output"] or "")[1] > 0) for row in rows]
    for row, f in zip(rows, flags):
        row["toxic"] = bool(f)
    extra["toxicity_rate"] = dict(zip(("value", "stderr"), M.mean_stderr(flags)))


def _aggregate(task: Task, rows: list[dict]) -> dict:
    if task.type == "redteam":
        return redteam.aggregate(rows)
    if task.type == "perplexity":
        out = {}
        for k, v in M.perplexities(rows).items():
            out[k] = {"value": v, "stderr": M.bootstrap_stderr(lambda rs, k=k: M.perplexities(rs)[k], rows, 200)}
        return out
    names = sorted({k for row in rows for k in row["scores"] if not k.startswith("_")})
    out = {k: dict(zip(("value", "stderr"), M.mean_stderr([row["scores"][k] for row in rows if k in row["scores"]])))
           for k in names}
    if task.type == "multiple_choice" and rows and "_confidence" in rows[0]["scores"]:
        pairs = [(row["scores"]["_confidence"], row["scores"]["acc"]) for row in rows]
        for bins, name in ((10, "ece_10bin"), (1, "ece_1bin")):
            fn = lambda ps, b=bins: M.ece([p[0] for p in ps], [p[1] for p in ps], b)
            out[name] = {"value": fn(pairs), "stderr": M.bootstrap_stderr(fn, pairs, 200)}
    return out


def evaluate(model: str | Path | Model, tasks: list[str], out: str | Path | None = None, limit: int = 0,
             num_fewshot: int | None = None, batch_size: int = 16, base: str | None = None, base_url: str = "",
             api_key: str = "", cache: Path | None = None, concurrency: int = 4, prices: Path | None = None,
             contamination: bool = True, workspace: str | Path | None = None, judge: Model | None = None,
             **model_kw) -> Path:
    """Evaluate a model on tasks: results.json (metrics with standard errors) and samples.jsonl (one row per item).

    Returns the eval run folder; `fmkit eval report RUN` draws it. `judge` (Python only) replaces the judge model a
    judge task names; other keywords (dtype, trust_pickle, ...) go to the local model.

    Args:
        model: Model reference: a model or adapter folder, a model name in the workspace, hf:ORG/NAME, openai:NAME
            or anthropic:NAME.
        tasks: Task YAML files, suites or built-in names (stdlib_docstring_to_name, humaneval, redteam, ...).
        out: Run folder (default <workspace>/evals/MODEL-TIME).
        limit: Evaluate the first N items of each task (0: all).
        num_fewshot: Override each task's few-shot count.
        batch_size: Local models: sequences per forward pass.
        base: An adapter's base model, instead of the one the adapter names.
        base_url: OpenAI-compatible server URL for openai:NAME (e.g. http://localhost:8000/v1).
        api_key: API key for hosted models (default $OPENAI_API_KEY / $ANTHROPIC_API_KEY).
        cache: SQLite response cache for hosted models (repeated runs cost nothing).
        concurrency: Hosted models: requests in flight.
        prices: Price table YAML for cost accounting (default: the packaged one).
        contamination: Check items against the model's training data (from its lineage), or Min-K% without it.
        workspace: Workspace folder: eval runs, the registry, and bare model names.
    """
    started = time.time()
    if limit < 0:
        raise FmkitError(f"limit must be 0 (all items) or a positive number of items, got {limit}")
    tasks = [tasks] if isinstance(tasks, (str, Path)) else tasks   # fmkit.evaluate(model, "task") names one task
    loaded = load_tasks(tasks)   # check every task before loading the model
    if not loaded:
        raise FmkitError("name at least one task: a YAML file or a built-in name such as stdlib_docstring_to_name")
    if isinstance(model, Model):
        m = model
    else:
        from ..models.reference import resolve

        m = get_model(resolve(model, base, workspace), base_url=base_url, api_key=api_key, cache=cache,
                      concurrency=concurrency, batch_size=batch_size, prices=prices, **model_kw)
    ws = Workspace(workspace)
    desc = m.describe()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out else ws.path("evals", f"{m.name.replace(':', '-').replace('/', '-')}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    checker = _checker(desc) if contamination else None
    results, samples = {}, []
    tok_fp = _tokenizer_fingerprint(m)
    for task in loaded:
        if num_fewshot is not None:
            task.num_fewshot = num_fewshot
        items = load_items(task)
        if limit or task.limit:
            items = items[:min(x for x in (limit, task.limit) if x)]
        if not items:
            raise FmkitError(f"{task.source}: the dataset has no items")
        pool = load_items(task, task.fewshot_dataset) if task.fewshot_dataset else items
        r = Renderer(task)
        t0 = time.time()
        status(f"eval: {task.task} ({task.type}, {len(items)} items) on {m.name}")
        rows = {"multiple_choice": lambda: _mc(m, task, r, items, pool, batch_size),
                "generate_until": lambda: _gen(m, task, r, items, pool),
                "code": lambda: _code(m, task, r, items),
                "perplexity": lambda: _ppl(m, task, r, items),
                "judge": lambda: _judge(m, task, r, items, judge),
                "redteam": lambda: redteam.run(m, task, items)}[task.type]()
        extra = _perturbed(m, task, items, pool, batch_size, rows)
        _toxicity(task, rows, extra)
        seconds = time.time() - t0
        ids = [str(it.get(task.doc_to_id, n)) if task.doc_to_id else str(n) for n, it in enumerate(items)]
        ids = [row["_id"] for row in rows] if rows and "_id" in rows[0] else ids   # red-team items expand
        if checker is not None:
            for row, item in zip(rows, items):
                gold = row.get("choices", [None])[row["target"]] if task.type == "multiple_choice" else row["target"]
                row["contamination"] = checker.check(row["_text"] + " " + str(gold))
        fewshot_ids = sorted({i for row in rows for i in row.get("fewshot", [])})
        res = {"type": task.type, "items": len(rows), "metrics": {**_aggregate(task, rows), **extra},
               "fingerprint": task.fingerprint(fewshot_ids, tok_fp), "num_fewshot": task.num_fewshot,
               "target_delimiter": task.target_delimiter, "source": task.source, "seconds": round(seconds, 3),
               "items_per_second": round(len(rows) / max(seconds, 1e-9), 3),
               "seconds_per_item": round(seconds / max(len(rows), 1), 4)}
        unparsable = sum(1 for row in rows if row.get("unparsable"))
        if task.type == "judge":
            res["unparsable_dropped"] = unparsable
        if checker is None and contamination and hasattr(m, "folder") and task.type not in ("code", "redteam"):
            from ..providers.local import token_logprobs
            from .contamination import min_k_prob

            lps = token_logprobs(m, [row["_text"] for row in rows])
            for row, lp in zip(rows, lps):
                row["min_k_prob"] = min_k_prob(lp)
            res["contamination"] = {"dataset": None, "note": "training data unknown; Min-K% prob (k=20%) per item "
                                    "in samples.jsonl, higher = more likely seen",
                                    "min_k_prob_mean": M.mean_stderr([row["min_k_prob"] for row in rows])[0]}
        if checker is not None:
            dirty = [row for row in rows if row["contamination"]["contaminated"]]
            clean = [row for row in rows if not row["contamination"]["contaminated"]]
            res["contamination"] = {"dataset": str(checker.dataset), "contaminated_items": len(dirty),
                                    "clean": _aggregate(task, clean) if clean else {},
                                    "contaminated": _aggregate(task, dirty) if dirty else {}}
        results[task.task] = res
        for id_, row in zip(ids, rows):
            samples.append({"task": task.task, "id": id_, **{k: v for k, v in row.items() if not k.startswith("_")},
                            "scores": {k: v for k, v in row["scores"].items() if not k.startswith("_")}})
    doc = {"format": "fmkit.eval/1", "model": desc, "results": results,
           "usage": vars(m.usage), "config": {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size},
           "seconds": round(time.time() - started, 2), "created": stamp}
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    with open(out / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s, default=str) + "\n")
    art = ws.add_artifact("eval", out, {"model": desc.get("name"), "tasks": list(results)},
                          parents=[desc.get("id", "")])
    write_manifest(out, {"kind": "eval", "id": art, "model": desc, "tasks": list(results)})
    return out


def _checker(desc: dict):
    from .contamination import ContaminationChecker, training_dataset

    ds = training_dataset(desc.get("lineage", {}))
    return ContaminationChecker(ds) if ds else None


def _tokenizer_fingerprint(m: Model) -> str:
    import hashlib

    folder = getattr(m, "folder", None)
    if folder and (Path(folder) / "tokenizer.json").is_file():
        return hashlib.sha256((Path(folder) / "tokenizer.json").read_bytes()).hexdigest()[:16]
    return m.name
