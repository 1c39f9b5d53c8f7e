"""The adaptation ladder on real data, through `fmkit adapt auto`.

Task: which function does this docstring describe? (`stdlib_docstring_to_name`: held-out stdlib modules, four
candidate names from the same module, scored by log-likelihood with fmkit eval.) The few-shot examples and the
fine-tuning data (--train) and the RAG index and continued pre-training text (--docs) are all docstring/name pairs
from the *training* modules, so no rung sees a held-out item. Every rung is compared with the best so far by an
exact McNemar test on the same items; the metric is acc_norm (the name's log-likelihood per byte: summed
log-likelihoods favour short names).

    fmkit quickstart
    fmkit pretrain examples/ladder_model.yaml --data.shards=fmkit-workspace/shards/stdlib-train \\
        --data.val_shards=fmkit-workspace/shards/stdlib-val           # ~25 minutes on 2 cores
    python examples/adaptation_ladder.py --model fmkit-workspace/models/ladder

The same as one command, once the two inputs are written:

    fmkit adapt auto MODEL stdlib_docstring_to_name --train train.jsonl --docs pairs/ --metric acc_norm \\
        --lora-steps 300 --full-steps 300 --pretrain-steps 300
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import fmkit
from fmkit.evals.stdlib_tasks import documented_functions


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """train.jsonl (prompt: the docstring as a comment and `def`; completion: the name) and pairs/ (one text file
    per pair) from the training modules' documented functions."""
    pairs = [(doc, name) for _, name, doc in documented_functions("train")]
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"# {doc}\ndef", "completion": f" {name}("}) + "\n"
                             for doc, name in pairs))
    docs = folder / "pairs"
    docs.mkdir(exist_ok=True)
    for n, (doc, name) in enumerate(pairs):
        (docs / f"{n:05d}.txt").write_text(f"# {doc}\ndef {name}(...)\n")
    return train, docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmkit-workspace/models/ladder")
    ap.add_argument("--steps", type=int, default=300, help="LoRA, full fine-tuning and continued pre-training steps")
    ap.add_argument("--workspace", default=None)
    args = ap.parse_args()
    train, docs = write_inputs(Path(args.workspace or "fmkit-workspace") / "ladder-inputs")
    fmkit.adapt_auto(args.model, "stdlib_docstring_to_name", train=train, docs=docs, metric="acc_norm",
                     lora_steps=args.steps, full_steps=args.steps, pretrain_steps=args.steps, batch_size=16,
                     name="stdlib-docstring-ladder", workspace=args.workspace)   # prints its table


if __name__ == "__main__":
    main()
