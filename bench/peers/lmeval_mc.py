"""lm-evaluation-harness peer of bench/eval_throughput.py: one local multiple-choice task, hf backend, CPU, fp32.

Runs with the interpreter of the environment built by bench/peers/lmeval_env.sh (never the project's .venv):

    python lmeval_mc.py --model MODEL_DIR --data ITEMS.jsonl --batch-size N --out RESULT.json [--limit K] [--threads T]

ITEMS.jsonl holds one {"id": str, "question": str, "choices": [str, ...], "answer": int} per line. --limit K keeps
the first K lines (the file is cut before lm-eval sees it, so lm-eval's own --limit is not involved).

The task is written at run time as an lm-eval YAML task in a temporary folder and loaded through a TaskManager
that includes that folder:

    output_type: multiple_choice        dataset_path: json, data_files {test: ITEMS}, test_split: test
    doc_to_text: "{{question}}"         the benchmark owns the whole prompt; no few-shot, no description
    doc_to_choice: "{{choices}}"        doc_to_target: "{{answer}}"      target_delimiter: " " (the default)
    metric_list: acc, acc_norm (aggregation mean, higher is better)

so each choice becomes one loglikelihood request (context = question, continuation = " " + choice). The model is
lm-eval's `hf` backend (HFLM) with pretrained=MODEL_DIR, dtype=float32, device=cpu and the given batch size; all
its other arguments keep their defaults (add_bos_token unset, logits_cache on, max_length from the model config).

Timing (wall clock, perf_counter):
  seconds_load          importing torch + lm_eval and building the model with the registry call that
                        lm_eval.simple_evaluate itself makes for model="hf" (get_model("hf").create_from_arg_obj)
  seconds_task_index    TaskManager(include_path=...): lm-eval indexes every task YAML it ships (~15k) plus ours,
                        a fixed start-up cost that does not depend on the task or the model
  seconds_eval          lm_eval.simple_evaluate(model=<the built LM>, ...): task and dataset set-up, request
                        building, tokenization, scoring, metrics and sample logging; excludes both of the above
  seconds_loglikelihood the part of seconds_eval spent inside HFLM.loglikelihood (tokenization + forward passes)
  seconds_total         seconds_load + seconds_task_index + seconds_eval
--threads T sets torch's intra-op thread count (default: torch's own choice, reported in config.torch_threads).

RESULT.json: {"items", "seconds_total", "seconds_eval", "seconds_load", "seconds_task_index",
"seconds_loglikelihood", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr",
"per_item": [{"id", "loglikelihoods", "is_greedy", "acc", "acc_norm"}], "requests", "forward_rows", "forward_calls",
"config", "versions"}. per_item is in file order;
loglikelihoods are the summed log-probabilities of each choice's continuation tokens, in choice order.
"requests" counts loglikelihood requests (items x choices); "forward_rows" counts the sequences that reached the
model, fewer when lm-eval's logits cache lets requests with the same context + continuation[:-1] share one row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Everything here is local; never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK = "bench_mc"


def write_task(folder: Path, data: Path) -> None:
    import yaml

    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("lm_eval", "torch", "transformers", "tokenizers", "datasets", "accelerate", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's own choice)")
    args = ap.parse_args()

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        raise SystemExit(f"no items in {args.data}")

    with tempfile.TemporaryDirectory(prefix="lmeval-mc-") as tmp:
        tmp = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "datasets-cache")  # before datasets is imported
        data = tmp / "items.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_task(tmp, data)

        t0 = time.perf_counter()
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        import lm_eval
        from lm_eval.api.registry import get_model
        from lm_eval.tasks import TaskManager

        lm = get_model("hf").create_from_arg_obj(
            {"pretrained": str(args.model.resolve()), "dtype": "float32"},
            {"batch_size": args.batch_size, "max_batch_size": None, "device": "cpu"},
        )
        t1 = time.perf_counter()

        # Instrument the instance (not the class): time spent scoring, and how many rows reach the model.
        stats = {"ll_seconds": 0.0, "requests": 0, "calls": 0, "rows": 0}
        inner_ll, inner_call = lm.loglikelihood, lm._model_call

        def loglikelihood(requests, *a, **kw):
            s = time.perf_counter()
            stats["requests"] += len(requests)
            try:
                return inner_ll(requests, *a, **kw)
            finally:
                stats["ll_seconds"] += time.perf_counter() - s

        def model_call(inps, *a, **kw):
            stats["calls"] += 1
            stats["rows"] += int(inps.shape[0])
            return inner_call(inps, *a, **kw)

        lm.loglikelihood, lm._model_call = loglikelihood, model_call

        # TaskManager indexes every task YAML shipped with lm-eval (~15k) plus ours: a fixed start-up cost of the
        # harness, timed on its own and kept out of seconds_eval.
        task_manager = TaskManager(include_path=str(tmp))
        t2 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[TASK],
            task_manager=task_manager,
            batch_size=args.batch_size,
            device="cpu",
            log_samples=True,
            verbosity="WARNING",
        )
        t3 = time.perf_counter()

    res = out["results"][TASK]
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    per_item = []
    for s in samples:
        resps = s.get("filtered_resps") or [r[0] for r in s["resps"]]
        per_item.append({
            "id": s["doc"]["id"],
            "loglikelihoods": [float(r[0]) for r in resps],
            "is_greedy": [bool(r[1]) for r in resps],
            "acc": int(s["acc"]),
            "acc_norm": int(s["acc_norm"]),
        })
    if len(per_item) != len(rows):
        raise SystemExit(f"lm-eval scored {len(per_item)} of {len(rows)} items")

    tok = lm.tokenizer
    probe = "def f"
    result = {
        "items": len(per_item),
        "seconds_total": t3 - t0,
        "seconds_eval": t3 - t2,
        "seconds_load": t1 - t0,
        "seconds_task_index": t2 - t1,
        "seconds_loglikelihood": stats["ll_seconds"],
        "acc": res["acc,none"],
        "acc_norm": res["acc_norm,none"],
        "acc_stderr": res.get("acc_stderr,none"),
        "acc_norm_stderr": res.get("acc_norm_stderr,none"),
        "per_item": per_item,
        "requests": stats["requests"],
        "forward_calls": stats["calls"],
        "forward_rows": stats["rows"],
        "config": {
            "model": str(args.model.resolve()),
            "batch_size": args.batch_size,
            "device": "cpu",
            "dtype": str(next(lm.model.parameters()).dtype),
            "torch_threads": torch.get_num_threads(),
            "max_length": lm.max_length,
            "logits_cache": lm.logits_cache,
            "add_bos_token": lm.add_bos_token,
            "prefix_token_id": lm.prefix_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "tok_encode_adds_special_tokens": lm.tok_encode(probe) != tok.encode(probe, add_special_tokens=False),
            "target_delimiter": " ",
            "num_fewshot": 0,
        },
        "versions": versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
