"""The adaptation ladder on real data: zero-shot, few-shot, RAG, LoRA and full fine-tuning on the same items.

Task: which function does this docstring describe? (`stdlib_docstring_to_name`: held-out stdlib modules, four
candidate names from the same module, scored by log-likelihood with fmkit eval.) Few-shot examples, the RAG index
and the fine-tuning data all come from the *training* modules, so no rung sees a held-out item. Each rung is
compared with zero-shot by an exact McNemar test on the same items.

    fmkit quickstart && python examples/adaptation_ladder.py [--model fmkit-workspace/models/quickstart]

The quickstart model (1.3M parameters) is too small for the rungs to separate; examples/ladder_model.yaml trains
a larger one on the same data (~25 minutes on 2 cores) for the table in the README.

`fmkit adapt auto` is this ladder as a verb (any task, nearest-example few-shot, continued pre-training, a target
and a budget, each rung tested against the best so far); this script stays to reproduce the table in
docs/adapt.md, which reports both accuracies against zero-shot.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import yaml

from fmkit.evals.metrics import mcnemar
from fmkit.evals.runner import evaluate
from fmkit.evals.stdlib_tasks import docstring_to_name, documented_functions


def task_file(folder: Path, name: str, items: list[dict]) -> Path:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"task": name, "type": "multiple_choice", "dataset": {"path": f"{name}.jsonl"},
                                    "doc_to_text": "{{question}}", "doc_to_choice": "choices",
                                    "doc_to_target": "answer", "doc_to_id": "id", "metrics": ["acc", "acc_norm"]}))
    return path


def scores(run: Path, metric: str) -> dict[str, float]:
    return {json.loads(line)["id"]: json.loads(line)["scores"][metric]
            for line in (run / "samples.jsonl").read_text().splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("fmkit-workspace/models/quickstart"))
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--lora-steps", type=int, default=300)
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"no model at {args.model}: run `fmkit quickstart` first or pass --model")
    held_out = docstring_to_name(split="val")
    train_pairs = [{"doc": d, "name": n} for _, n, d in documented_functions("train")]
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="ladder-"))
    line = lambda p: f"# {p['doc']}\ndef {p['name']}(...)\n\n"

    rows = {}
    base = [dict(i, question=f"# {i['doc']}\ndef") for i in held_out]
    rows["zero-shot"] = base
    shots = rng.sample(train_pairs, args.shots)
    rows[f"{args.shots}-shot (random, seeded)"] = [dict(i, question="".join(map(line, shots)) + i["question"])
                                                  for i in base]
    try:
        from fmkit.adapt import rag

        docs = tmp / "train_pairs"
        docs.mkdir()
        for n, p in enumerate(train_pairs):
            (docs / f"{n:05d}.txt").write_text(line(p))
        rag.index(docs, tmp / "rag-index")
        rag_rows = []
        for i in base:
            hits = rag.ask(tmp / "rag-index", i["doc"], k=args.shots)["chunks"]
            context = "".join(h["text"].strip() + "\n\n" for h in reversed(hits))
            rag_rows.append(dict(i, question=context + i["question"]))
        rows[f"RAG (top-{args.shots} training pairs)"] = rag_rows
    except ImportError:
        print("RAG rung skipped: fmkit.adapt.rag is not available")

    runs = {}
    for name, items in rows.items():
        runs[name] = evaluate(args.model, [task_file(tmp, "t", items)], out=tmp / f"run-{len(runs)}",
                              workspace=tmp / "ws", contamination=False)

    from fmkit.adapt.finetune import finetune, merge

    data = tmp / "lora.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"# {p['doc']}\ndef", "completion": f" {p['name']}("}) + "\n"
                            for p in train_pairs))
    adapter = finetune(args.model, data, tmp / "lora", lora=True, steps=args.lora_steps, batch_size=16, lr=2e-3,
                       template="none", workspace=tmp / "ws")
    merged = merge(adapter, tmp / "lora-merged")
    runs[f"LoRA (r=8, {args.lora_steps} steps on training pairs)"] = evaluate(
        merged, [task_file(tmp, "t", base)], out=tmp / "run-lora", workspace=tmp / "ws", contamination=False)
    full = finetune(args.model, data, tmp / "full", steps=args.lora_steps, batch_size=16, lr=5e-4, template="none",
                    workspace=tmp / "ws")
    runs[f"full fine-tune ({args.lora_steps} steps on training pairs)"] = evaluate(
        full, [task_file(tmp, "t", base)], out=tmp / "run-full", workspace=tmp / "ws", contamination=False)

    # Both metrics, each tested: acc sums the log-likelihood of the name's tokens, so it favours short names;
    # acc_norm divides by the name's length in bytes (lm-eval's definition).
    metrics = ("acc", "acc_norm")
    zero = {m: scores(runs["zero-shot"], m) for m in metrics}
    ids = sorted(zero["acc"])
    print(f"\n{len(ids)} held-out items, 4 choices (chance 0.25); model {args.model}")
    print("McNemar p vs zero-shot (right only on this rung / only zero-shot)\n")
    print("| rung | acc | p (acc) | acc_norm | p (acc_norm) |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        res = json.loads((run / "results.json").read_text())["results"]["t"]["metrics"]
        cells = []
        for m in metrics:
            s = scores(run, m)
            t = mcnemar([zero[m][i] for i in ids], [s[i] for i in ids])
            test = "—" if name == "zero-shot" else f"{t['p_value']:.2g} ({t['b_only']} / {t['a_only']})"
            cells += [f"{res[m]['value']:.3f} ± {res[m]['stderr']:.3f}", test]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
