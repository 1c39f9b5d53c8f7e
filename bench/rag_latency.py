"""Latency and recall of fmkit RAG retrieval on 100k chunks.

Builds an index of synthetic chunks (16-word texts of made-up words with Zipf-like frequencies, 384-d unit vectors
drawn around 1000 gaussian cluster centres, half the chunks tagged lang=en), then for 1000 queries (a vector near a
random chunk's, and three of that chunk's words) measures:

- the dense search alone as `ask` runs it (float16 scan of every vector, best 2n rescored from float32 in SQLite;
  embedding excluded): p50/p99 and recall@10 against a float64 brute-force reference; a plain numpy float32
  matmul for contrast;
- a whole `fmkit.adapt.rag.ask` call (BM25 over FTS5 + dense + fusion + fetching the chunks; the encoder is
  replaced by a lookup of the precomputed query vector, so embedding time is excluded), without and with a
  metadata filter.

Targets: dense p50 < 10 ms and recall@10 >= 0.95. `--compare` also times faiss HNSW and usearch HNSW on the same
vectors when those packages are importable (they are not fmkit dependencies).

    python bench/rag_latency.py [--chunks 100000] [--queries 1000] [--compare]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("FMKIT_QUIET", "1")

from fmkit.adapt import rag  # noqa: E402

DIM = 384


def synthetic(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # Word frequencies of text without its stopwords (which queries drop): Zipf-Mandelbrot over 30k words, so the
    # commonest word is in ~5% of chunks and most words are rare.
    rank = np.arange(30000)
    p = 1.0 / (rank + 50)
    words = rng.choice(rank, size=(n, 16), p=p / p.sum())
    return [" ".join(f"w{w}x" for w in row) for row in words], vectors


def build(index_dir: Path, texts: list[str], vectors: np.ndarray) -> None:
    """Fill an index the way `rag.index` does, minus reading files and embedding: documents of 10 chunks, every
    other document tagged lang=en."""
    db = rag.store.open_index(index_dir, create=True)
    rag.store.set_setting(db, "encoder", "synthetic")
    rag.store.set_setting(db, "dim", DIM)
    for d in range(0, len(texts), 10):
        rag.store.add_document(db, f"/synthetic/{d // 10}.txt", f"{d // 10}.txt", "", f"doc {d // 10}",
                               texts[d:d + 10], vectors[d:d + 10], {"lang": "en" if d // 10 % 2 else "de"})
    rag.store.commit(db)
    rag.store.vectors(db, index_dir)
    db.close()


class LookupEncoder:
    """Stands in for the embedding model: returns the query's precomputed vector."""

    def __init__(self, table: dict):
        self.table = table

    def embed(self, texts):
        return np.stack([self.table[t] for t in texts])


def stats(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms"


def timed(fn, items) -> tuple[list, list[float]]:
    out, ms = [], []
    for it in items:
        t = time.perf_counter()
        out.append(fn(it))
        ms.append((time.perf_counter() - t) * 1000)
    return out, ms


def recall(found: list, truth: np.ndarray) -> float:
    return float(np.mean([len(set(map(int, f)) & set(map(int, t))) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--compare", action="store_true", help="also time faiss and usearch HNSW if importable")
    args = ap.parse_args()

    t = time.time()
    texts, vectors = synthetic(args.chunks)
    rng = np.random.default_rng(1)
    picks = rng.integers(0, args.chunks, args.queries)
    queries = vectors[picks] + 0.05 * rng.standard_normal((args.queries, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    questions = [f"q{i} " + " ".join(rng.choice(texts[p].split(), 3, replace=False)) for i, p in enumerate(picks)]

    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "index"
        build(index_dir, texts, vectors)
        print(f"built {args.chunks:,} chunks x {DIM} in {time.time() - t:.1f} s "
              f"({sum(f.stat().st_size for f in index_dir.iterdir()) / 1e6:.0f} MB on disk)")

        # Reference: float64 brute force, in blocks of queries to bound memory
        v64, q64 = vectors.astype(np.float64), queries.astype(np.float64)
        truth = np.concatenate([np.argsort(-(v64 @ q64[b:b + 100].T), axis=0)[:10].T
                                for b in range(0, args.queries, 100)])
        del v64
        db = rag.store.open_index(index_dir)
        ids, matrix = rag.store.vectors(db, index_dir)
        found, ms = timed(lambda q: [i - 1 for i, _ in rag.retrieve.dense(db, ids, matrix, q, None, 10)], queries)
        db.close()
        r = recall(found, truth)   # chunk ids start at 1, rows at 0
        dense_p50 = float(np.percentile(ms, 50))
        print(f"dense (f16 scan + rescore) {stats(ms)}  recall@10 {r:.3f}")
        found, ms32 = timed(lambda q: np.argpartition(vectors @ q, len(vectors) - 10)[-10:], queries)
        print(f"numpy float32 matmul       {stats(ms32)}  recall@10 {recall(found, truth):.3f}  (for contrast)")

        encoder = LookupEncoder(dict(zip(questions, queries)))
        _, ms_ask = timed(lambda q: rag.ask(index_dir, q, k=10, encoder=encoder), questions)
        print(f"ask, hybrid                {stats(ms_ask)}")
        _, ms_filter = timed(lambda q: rag.ask(index_dir, q, k=10, encoder=encoder, filters={"lang": "en"}),
                             questions[:200])
        print(f"ask, hybrid + lang filter  {stats(ms_filter)}  (50% of chunks pass; {len(ms_filter)} queries)")

        if args.compare:
            compare(vectors, queries, truth)

    ok = dense_p50 < 10 and r >= 0.95
    print(f"targets (dense p50 < 10 ms, recall@10 >= 0.95): {'met' if ok else 'NOT met'}")
    print(json.dumps({"chunks": args.chunks, "queries": args.queries, "dense_p50_ms": dense_p50,
                      "dense_p99_ms": float(np.percentile(ms, 99)), "recall_at_10": r,
                      "ask_p50_ms": float(np.percentile(ms_ask, 50)), "ask_p99_ms": float(np.percentile(ms_ask, 99)),
                      "ask_filtered_p50_ms": float(np.percentile(ms_filter, 50)),
                      "ask_filtered_p99_ms": float(np.percentile(ms_filter, 99))}))


def compare(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> None:
    try:
        import faiss

        t = time.time()
        hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 64
        hnsw.add(vectors)
        built = time.time() - t
        for ef in (32, 64, 128):
            hnsw.hnsw.efSearch = ef
            found, ms = timed(lambda q: hnsw.search(q[None], 10)[1][0], queries)
            print(f"faiss HNSW32 ef={ef:<4}     {stats(ms)}  recall@10 {recall(found, truth):.3f}  build {built:.0f} s")
    except ImportError:
        print("faiss not installed: skipped")
    try:
        from usearch.index import Index

        t = time.time()
        index = Index(ndim=DIM, metric="ip", dtype="f32", connectivity=16)
        index.add(np.arange(len(vectors)), vectors)
        built = time.time() - t
        for ef in (32, 64, 128):
            index.expansion_search = ef
            found, ms = timed(lambda q: index.search(q, 10).keys, queries)
            print(f"usearch HNSW16 ef={ef:<4}   {stats(ms)}  recall@10 {recall(found, truth):.3f}  build {built:.0f} s")
    except ImportError:
        print("usearch not installed: skipped")


if __name__ == "__main__":
    main()
