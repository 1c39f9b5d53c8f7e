"""fmkit curate vs datatrove on the same corpus and filters, each with its default MinHash dedup: documents/s, and
near-duplicate recall and precision on planted pairs.

Corpus: every .py file of the local standard library (tests included), every docstring of 40+ words in them and
the pydoc topic texts, plus two planted sets of near-copies of some of them:
  easy  1% of words replaced, sometimes a line appended or the text lowercased (word 5-gram Jaccard ~0.85-0.98);
  hard  words swapped for other words of the same document (~3%), as many as it takes to bring the true word
        5-gram Jaccard to a target drawn uniformly from 0.70-0.85.
Pipeline on both sides: Gopher quality and Gopher repetition with datatrove's defaults on every document, then
MinHash dedup over word 5-grams with each tool's defaults: datatrove 14 bands x 8 rows, every bucket unioned;
fmkit 28 bands x 4 rows, each candidate verified by exact Jaccard >= 0.7 with its cluster's survivor. datatrove
runs in its own virtual environment (bench/peers/datatrove_env.sh, created on first use), as its documented
4-stage MinHash recipe with LocalPipelineExecutor; fmkit runs `fmkit.curate` with the same number of workers.

Recall: planted pairs (both members past the filters) that the tool put in one cluster, per planted set.
Precision: of the documents the tool removed as near-duplicates, those whose true 5-gram Jaccard with their
cluster's survivor is at least 0.5 (planted pairs and the standard library's own near-copies both count).

    python bench/curate_throughput.py [--workers 2] [--planted 300] [--hard 300]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from common import run_code

HERE = Path(__file__).parent
FILTERS = [{"gopher_quality": {"applies_to": "all"}}, {"gopher_repetition": {"applies_to": "all"}}]
ROOT = HERE.parent


def stdlib_documents() -> list[tuple[str, str]]:
    """Every .py file of the standard library (tests included), every docstring of 40+ words in them, and the
    pydoc topic texts: code and the prose written about it."""
    import ast
    import warnings

    from fmkit.data.stdlib import pydoc_topics

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if "site-packages" in rel.parts or "__pycache__" in rel.parts:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append((f"stdlib/{rel}", text))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 40:
                    docs.append((f"stdlib/{rel}#{getattr(node, 'name', '')}:{getattr(node, 'lineno', 0)}", doc))
    docs += [(i, t) for i, t in pydoc_topics() if t.strip()]
    return docs


def jaccard5(a: str | set, b: str) -> float:
    """True word 5-gram Jaccard of two texts (or of a text's shingle set and a text), fmkit's normalisation."""
    from fmkit.data.dedup import shingles

    x = a if isinstance(a, set) else set(shingles(a, 5))
    y = set(shingles(b, 5))
    return len(x & y) / max(1, len(x | y))


def hard_copy(text: str, rng: random.Random, low: float = 0.70, high: float = 0.85) -> str | None:
    """`text` with words swapped for other words of the same document until its word 5-gram Jaccard with the
    original reaches a target drawn from [low, high]; None when no number of swaps lands in the range."""
    from fmkit.data.dedup import shingles

    parts = re.split(r"(\s+)", text)
    word_at = [i for i, p in enumerate(parts) if p and not p.isspace()]
    order = rng.sample(word_at, len(word_at))
    fill = [rng.choice(word_at) for _ in order]
    target = rng.uniform(low, high)
    base = set(shingles(text, 5))

    def swapped(k):
        out = list(parts)
        for i, j in zip(order[:k], fill[:k]):
            out[i] = parts[j]
        return "".join(out)

    lo, hi = 0, len(order)       # the fewest swaps that bring Jaccard down to the target (about monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        if jaccard5(base, swapped(mid)) > target:
            lo = mid + 1
        else:
            hi = mid
    copy = swapped(lo)
    return copy if low <= jaccard5(base, copy) <= high else None


def build_corpus(path: Path, planted: int, hard: int, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    docs = stdlib_documents()
    rng = random.Random(seed)
    candidates = [d for d in docs if 100 <= len(d[1].split()) <= 20_000]
    picked = rng.sample(candidates, planted + 2 * hard)    # spares for hard targets no swap count reaches
    pairs = []
    for k, (doc_id, text) in enumerate(picked[:planted]):
        parts = re.split(r"(\s+)", text)              # words and the whitespace between them, layout kept
        word_at = [i for i, p in enumerate(parts) if p and not p.isspace()]
        for _ in range(max(1, len(word_at) // 100)):
            parts[rng.choice(word_at)] = rng.choice(["alpha", "beta", "gamma", "delta", "omega"])
        copy = "".join(parts)
        if k % 3 == 1:
            copy += "\n(copied from an older revision)\n"
        elif k % 3 == 2:
            copy = copy.lower()
        copy_id = f"planted/{k:04d}"
        docs.append((copy_id, copy))
        pairs.append((doc_id, copy_id))
    hard_pairs = []
    for doc_id, text in picked[planted:]:
        copy = hard_copy(text, rng) if len(hard_pairs) < hard else None
        if copy is not None:
            copy_id = f"planted-hard/{len(hard_pairs):04d}"
            docs.append((copy_id, copy))
            hard_pairs.append((doc_id, copy_id))
    rng.shuffle(docs)   # planted copies land before or after their originals
    with open(path, "w") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return {"easy": pairs, "hard": hard_pairs}


def run_fmkit(corpus: Path, work: Path, workers: int, filters: bool = True) -> dict:
    """In a fresh process, like the peer: fmkit.curate over the JSONL, then the same result fields."""
    code = f"""
import json, time, glob
import pyarrow.parquet as pq, pyarrow as pa
from fmkit.data.curate import curate
recipe = dict(name="bench", out={str(work / 'ds')!r}, workspace={str(work / 'ws')!r}, workers={workers},
              sources=[dict(name="corpus", path={str(corpus)!r}, id_field="id")],
              pipeline={FILTERS if filters else []!r},
              dedup=dict(exact=False, minhash=True))
from fmkit.data.recipe import CurateRecipe, DedupConfig
r = CurateRecipe(**{{k: v for k, v in recipe.items() if k != "dedup"}}, dedup=DedupConfig(**recipe["dedup"]))
t = time.perf_counter()
ds = curate(r)
seconds = time.perf_counter() - t
m = json.loads((ds / "manifest.json").read_text())
data = pa.concat_tables([pq.read_table(p, columns=["id", "cluster_id"]) for p in sorted(glob.glob(str(ds / "data/*.parquet")))])
rej = pq.read_table(ds / "rejected/dedup.parquet", columns=["id", "duplicate_of"]).to_pylist()
filtered = [i for p in sorted(glob.glob(str(ds / "rejected/unit-*.parquet")))
            for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
cluster_of = {{i: c for i, c in zip(data.column("id").to_pylist(), data.column("cluster_id").to_pylist()) if c}}
removed = [r["id"] for r in rej]
for r in rej:
    cluster_of[r["id"]] = r["duplicate_of"]
print(json.dumps(dict(seconds=seconds, docs_in=m["documents_in"], kept=m["output"]["documents"],
                      dedup_removed=removed, cluster_of=cluster_of, filtered=filtered,
                      dropped={{b["block"]: b["dropped_by"] for b in m["blocks"]}})))
"""
    return run_code(code, name="fmkit run")


def run_datatrove(corpus: Path, work: Path, workers: int, filters: bool = True) -> dict | None:
    env_dir = ROOT / ".bench-envs" / "datatrove"
    setup = subprocess.run(["bash", str(HERE / "peers" / "datatrove_env.sh"), str(env_dir)],
                           capture_output=True, text=True)
    if setup.returncode:
        print(f"datatrove environment could not be created; peer skipped:\n{setup.stderr[-2000:]}")
        return None
    out = work / "datatrove.json"
    proc = subprocess.run([str(env_dir / "bin" / "python"), str(HERE / "peers" / "datatrove_pipeline.py"),
                           "--input", str(corpus), "--work", str(work / "dt"), "--workers", str(workers),
                           "--out", str(out)] + ([] if filters else ["--no-filters"]), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"datatrove run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["filtered"] = [i for by_reason in result["dropped_ids"].values() for ids in by_reason.values() for i in ids]
    return result


def quality(result: dict, planted: dict, texts: dict) -> dict:
    from fmkit.data.dedup import shingles

    cluster = result["cluster_of"]
    removed = set(result["dedup_removed"])
    dropped_by_filter = set(result["filtered"])
    out = {}
    for name, pairs in planted.items():
        judged = [(a, b) for a, b in pairs if a not in dropped_by_filter and b not in dropped_by_filter]
        found = sum(1 for a, b in judged if a in cluster and cluster.get(a) == cluster.get(b))
        out[name] = {"pairs": len(judged), "recall": found / max(1, len(judged))}
    sh = {}

    def jac(a, b):
        for x in (a, b):
            if x not in sh:
                sh[x] = set(shingles(texts[x], 5))
        return len(sh[a] & sh[b]) / max(1, len(sh[a] | sh[b]))

    survivor = {c: i for i, c in cluster.items() if i not in removed}   # the kept member of each cluster
    good = sum(1 for d in removed if survivor.get(cluster.get(d)) and jac(d, survivor[cluster[d]]) >= 0.5)
    return {**out, "removed": len(removed), "precision": good / max(1, len(removed))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--planted", type=int, default=300, help="easy near-copies (1%% of words replaced)")
    ap.add_argument("--hard", type=int, default=300, help="near-copies at word 5-gram Jaccard 0.70-0.85")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        planted = build_corpus(corpus, args.planted, args.hard)
        texts = {}
        with open(corpus) as f:
            for line in f:
                row = json.loads(line)
                texts[row["id"]] = row["text"]
        hard_j = [jaccard5(texts[a], texts[b]) for a, b in planted["hard"]]
        print(f"corpus: {len(texts):,} documents ({corpus.stat().st_size / 1e6:.1f} MB), planted near-duplicate "
              f"pairs: {len(planted['easy'])} easy, {len(planted['hard'])} hard (word 5-gram Jaccard "
              f"{min(hard_j, default=0):.2f}-{max(hard_j, default=0):.2f}); {args.workers} workers; "
              f"{os.cpu_count()} cores")
        for filters in (True, False):
            title = ("Gopher quality + Gopher repetition + MinHash dedup" if filters else
                     "MinHash dedup only (every planted pair judged)")
            rows = [("fmkit", run_fmkit(corpus, tmp / f"fmkit{filters}", args.workers, filters))]
            dt = run_datatrove(corpus, tmp / f"datatrove{filters}", args.workers, filters)
            if dt:
                rows.append(("datatrove 0.10.1", dt))
            print(f"\n{title}\n{'':18} {'seconds':>8} {'docs/s':>8} {'kept':>6} {'dedup removed':>14} "
                  f"{'precision':>9} {'recall easy (pairs)':>20} {'recall hard (pairs)':>20}")
            for name, r in rows:
                q = quality(r, planted, texts)
                print(f"{name:18} {r['seconds']:8.1f} {r['docs_in'] / r['seconds']:8.0f} {r['kept']:6d} "
                      f"{q['removed']:14d} {q['precision']:9.3f} "
                      + " ".join(f"{q[k]['recall']:13.3f} ({q[k]['pairs']:4d})" for k in ("easy", "hard")))
            if dt:
                fm = rows[0][1]
                print(f"speed-up: {(fm['docs_in'] / fm['seconds']) / (dt['docs_in'] / dt['seconds']):.2f}x "
                      f"datatrove's documents/s")
            if filters:
                for name, r in rows:
                    print(f"{name} filter drops: {json.dumps(r['dropped'])}")

if __name__ == "__main__":
    main()
