"""The adaptation ladder on real data: zero-shot, few-shot, RAG and LoRA on the same held-out items.

Task: which function does this docstring describe? (`stdlib_docstring_to_name`: held-out stdlib modules, four
candidate names from the same module, scored by log-likelihood with fmkit eval.) The model is the quickstart
model. Few-shot examples, the RAG index and the LoRA training data all come from the *training* modules, so no
rung sees a held-out item. Each rung is compared with zero-shot by an exact McNemar test on the same items.

    fmkit quickstart && python examples/adaptation_ladder.py [--model fmkit-workspace/models/quickstart]
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


def scores(run: Path) -> dict[str, float]:
    return {json.loads(line)["id"]: json.loads(line)["scores"]["acc"]
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
    runs["LoRA (r=8, on training pairs)"] = evaluate(merged, [task_file(tmp, "t", base)], out=tmp / "run-lora",
                                                     workspace=tmp / "ws", contamination=False)

    zero = scores(runs["zero-shot"])
    ids = sorted(zero)
    print(f"\n{len(ids)} held-out items, 4 choices (chance 0.25); model {args.model}\n")
    print("| rung | acc | acc_norm | right only here / only zero-shot | McNemar p vs zero-shot |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        res = json.loads((run / "results.json").read_text())["results"]["t"]["metrics"]
        s = scores(run)
        t = mcnemar([zero[i] for i in ids], [s[i] for i in ids])
        p = "—" if name == "zero-shot" else f"{t['p_value']:.3g}"
        both = "—" if name == "zero-shot" else f"{t['b_only']} / {t['a_only']}"
        print(f"| {name} | {res['acc']['value']:.3f} ± {res['acc']['stderr']:.3f} | "
              f"{res['acc_norm']['value']:.3f} | {both} | {p} |")


if __name__ == "__main__":
    main()
