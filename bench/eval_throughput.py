"""fmkit eval vs lm-evaluation-harness (hf backend) on the same checkpoint and the same local multiple-choice task:
items/s, and acc / acc_norm side by side (they must be identical).

Task: stdlib_docstring_to_name (which function of a held-out stdlib module does this docstring describe? 4
choices), each question preceded by three fixed solved examples so contexts are a realistic length. It is written
to a JSONL file that both tools read; neither adds few-shot examples of its own. The model is the quickstart model
when one exists (--model), else a freshly initialised fmkit `1m` decoder with a stdlib tokenizer. lm-eval runs in
its own virtual environment (bench/peers/lmeval_env.sh, created on first use); both run on the CPU in fp32 with
the same batch size, and the model load is timed apart from the evaluation.

    python bench/eval_throughput.py [--model DIR] [--batch-size 16] [--limit 0]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from common import run_code

HERE = Path(__file__).parent
ROOT = HERE.parent


def make_items(path: Path, limit: int) -> int:
    from fmkit.evals.stdlib_tasks import docstring_to_name

    items = docstring_to_name()
    shots = items[:3]
    prefix = "".join(f"# {s['doc']}\ndef {s['choices'][s['answer']]}(...)\n\n" for s in shots)
    rows = [{"id": it["id"], "question": prefix + f"# {it['doc']}\ndef", "choices": it["choices"],
             "answer": it["answer"]} for it in items[3:]]
    rows = rows[:limit] if limit else rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def make_model(folder: Path) -> Path:
    from fmkit.models.build import build_model
    from fmkit.models.io import save_model
    from fmkit.tokenize.tokenizer import train_tokenizer

    tok = train_tokenizer("stdlib:train", folder / "tok", vocab_size=4096, max_bytes=4_000_000,
                          workspace=folder / "ws")
    from fmkit.models.build import model_config
    from fmkit.models.io import load_tokenizer

    t = load_tokenizer(tok)
    config = model_config("decoder", "1m", len(t), 512, {"pad": t.pad_token_id, "eos": t.eos_token_id})
    model = build_model(config, seed=0)
    return save_model(model, folder / "model", tok, {"kind": "model", "note": "random init, benchmark only"})


def run_fmkit(model: Path, items: Path, batch_size: int) -> dict:
    code = f"""
import json, time, yaml, pathlib
t0 = time.perf_counter()
from fmkit.providers.local import LocalModel
m = LocalModel({str(model)!r}, batch_size={batch_size})
t1 = time.perf_counter()
from fmkit.evals.runner import evaluate
task = pathlib.Path({str(items.parent)!r}) / "task.yaml"
task.write_text(yaml.safe_dump(dict(task="bench_mc", type="multiple_choice", dataset=dict(path={items.name!r}),
    doc_to_text="{{{{question}}}}", doc_to_choice="choices", doc_to_target="answer", doc_to_id="id",
    metrics=["acc", "acc_norm"])))
run = evaluate(m, [task], out=pathlib.Path({str(items.parent)!r}) / "fmkit-run", contamination=False,
               workspace=pathlib.Path({str(items.parent)!r}) / "ws")
t2 = time.perf_counter()
res = json.loads((run / "results.json").read_text())["results"]["bench_mc"]
rows = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
print(json.dumps(dict(items=res["items"], seconds_total=t2 - t0, seconds_eval=t2 - t1,
                      acc=res["metrics"]["acc"]["value"], acc_norm=res["metrics"]["acc_norm"]["value"],
                      per_item=[dict(id=r["id"], loglikelihoods=r["loglikelihoods"]) for r in rows])))
"""
    return run_code(code, name="fmkit run")


def run_lmeval(model: Path, items: Path, batch_size: int, work: Path) -> dict | None:
    env_dir = ROOT / ".bench-envs" / "lmeval"
    setup = subprocess.run(["bash", str(HERE / "peers" / "lmeval_env.sh"), str(env_dir)], capture_output=True,
                           text=True)
    if setup.returncode:
        print(f"lm-eval environment could not be created; peer skipped:\n{setup.stderr[-2000:]}")
        return None
    out = work / "lmeval.json"
    proc = subprocess.run([str(env_dir / "bin" / "python"), str(HERE / "peers" / "lmeval_mc.py"), "--model",
                           str(model), "--data", str(items), "--batch-size", str(batch_size), "--out", str(out)],
                          capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"lm-eval run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or make_model(tmp)
        items = tmp / "items.jsonl"
        n = make_items(items, args.limit)
        print(f"model {model}; {n} items x 4 choices; batch size {args.batch_size}; {os.cpu_count()} cores")
        rows = [("fmkit", run_fmkit(model, items, args.batch_size))]
        peer = run_lmeval(model, items, args.batch_size, tmp)
        if peer:
            rows.append(("lm-eval (hf)", peer))
        print(f"\n{'':14} {'items':>6} {'eval s':>8} {'items/s':>8} {'total s':>8} {'acc':>8} {'acc_norm':>9}")
        for name, r in rows:
            ev = r.get("seconds_eval") or r["seconds_total"]
            print(f"{name:14} {r['items']:6d} {ev:8.2f} {r['items'] / ev:8.1f} {r['seconds_total']:8.2f} "
                  f"{r['acc']:8.4f} {r['acc_norm']:9.4f}")
        if peer:
            fm = rows[0][1]
            ev = lambda r: r.get("seconds_eval") or r["seconds_total"]
            print(f"\nspeed-up: {(fm['items'] / ev(fm)) / (peer['items'] / ev(peer)):.2f}x lm-eval's items/s; "
                  f"acc identical: {fm['acc'] == peer['acc']}, acc_norm identical: {fm['acc_norm'] == peer['acc_norm']}")
            theirs = {str(p["id"]): p["loglikelihoods"] for p in peer.get("per_item", [])}
            diffs = [abs(a - b) for p in fm["per_item"] if str(p["id"]) in theirs
                     for a, b in zip(p["loglikelihoods"], theirs[str(p["id"])])]
            if diffs:
                print(f"largest per-choice log-likelihood difference: {max(diffs):.2e} over {len(diffs)} choices")


if __name__ == "__main__":
    main()
