"""Hybrid retrieval: BM25 over the FTS5 table, dense search over the float16 matrix (best candidates rescored in
float32), metadata filters applied inside both, and reciprocal rank fusion."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np

from .store import get_setting, meta_text

RRF_K = 60                   # the constant of reciprocal rank fusion (Cormack et al. 2009)

# Dropped from the BM25 query: they match most chunks, so they cost time and add nothing to the ranking.
STOPWORDS = set("a about all an and any are as at be been but by can did do does for from had has have he her his "
                "how i if in into is it its me my no not of on or our s she so t than that the their them then there "
                "these they this those to us was we were what when where which who whom why will with you your".split())


def conditions(filters: dict) -> list[tuple[str, list]]:
    """One (SQL on chunk_meta, parameters) per filter key: {key: value} or {key: [any of these values]}."""
    out = []
    for key, value in filters.items():
        values = [meta_text(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])]
        out.append((f"key = ? AND value IN ({', '.join('?' * len(values))})", [str(key), *values]))
    return out


def where_sql(filters: dict | None) -> tuple[str, list]:
    """SQL conditions on `chunks_fts` for the filters: a primary-key probe per row that matches the BM25 query."""
    conds = conditions(filters or {})
    sql = " AND ".join(f"EXISTS (SELECT 1 FROM chunk_meta WHERE chunk = chunks_fts.rowid AND {c})" for c, _ in conds)
    return sql or "1", [p for _, ps in conds for p in ps]


_ALLOWED: dict[tuple, np.ndarray] = {}   # (folder, generation, filters) -> rows; repeated filters cost nothing


def allowed_rows(db: sqlite3.Connection, index_dir: Path, ids: np.ndarray, filters: dict) -> np.ndarray:
    """Rows of the vector matrix (ascending) whose chunks pass the filters, via the (key, value, chunk) index."""
    key = (str(Path(index_dir).resolve()), get_setting(db, "generation"),
           json.dumps(filters, sort_keys=True, default=list))
    if key not in _ALLOWED:
        conds = conditions(filters)
        sql = " INTERSECT ".join(f"SELECT chunk FROM chunk_meta WHERE {c}" for c, _ in conds)
        rows = db.execute(sql + " ORDER BY 1", [p for _, ps in conds for p in ps]).fetchall()
        if len(_ALLOWED) >= 32:
            _ALLOWED.clear()
        _ALLOWED[key] = np.searchsorted(ids, np.array([r[0] for r in rows], dtype=np.int64))
    return _ALLOWED[key]


def fts_query(question: str) -> str:
    """The question's words as quoted FTS5 terms joined by OR: quoting makes every word a plain term (no operator,
    column filter or syntax error), and OR lets BM25 rank chunks that hold only some of the words."""
    words = [w for w in re.findall(r"\w+", question.lower()) if w not in STOPWORDS]
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


def bm25(db: sqlite3.Connection, question: str, where: str, params: list, n: int) -> list[tuple[int, float]]:
    query = fts_query(question)
    if not query:
        return []
    rows = db.execute(f"SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? AND {where} "
                      "ORDER BY bm25(chunks_fts) LIMIT ?", [query, *params, n]).fetchall()
    return [(i, -s) for i, s in rows]   # bm25() is lower-is-better; report higher-is-better


def dense(db: sqlite3.Connection, ids: np.ndarray, matrix, query: np.ndarray, rows: np.ndarray | None,
           n: int) -> list[tuple[int, float]]:
    """The `n` best chunks by inner product (unit vectors, so cosine) among `rows` of the matrix (None: all).

    Every row is scored in float16 (a memory-bound scan, so half the bytes is about half the time), then the best
    2n are rescored exactly from their float32 vectors in SQLite: float16 rounding (~2e-4) can only swap
    near-ties, never push a true top-n chunk below 2n.
    """
    import torch

    q = torch.from_numpy(query).to(matrix.dtype)
    if rows is None:
        scores = torch.mv(matrix, q)
    elif len(rows) < len(matrix) // 4:
        scores = torch.mv(matrix[torch.from_numpy(rows)], q)   # few allowed rows: gather, then score only those
    else:
        scores = torch.mv(matrix, q)[torch.from_numpy(rows)]
    top = torch.topk(scores, min(2 * n, len(scores))).indices.numpy()
    found = ids[top] if rows is None else ids[rows[top]]
    if not len(found):
        return []
    exact = db.execute(f"SELECT id, vector FROM chunks WHERE id IN ({', '.join('?' * len(found))})",
                       [int(i) for i in found]).fetchall()
    scored = [(cid, float(np.frombuffer(v, dtype=np.float32) @ query)) for cid, v in exact]
    return sorted(scored, key=lambda e: -e[1])[:n]


def fuse(rankings: dict[str, list[tuple[int, float]]], k: int) -> list[tuple[int, float, dict]]:
    """Reciprocal rank fusion: score = sum over retrievers of 1 / (60 + rank)."""
    fused: dict[int, list] = {}
    for name, ranking in rankings.items():
        for rank, (cid, score) in enumerate(ranking, 1):
            entry = fused.setdefault(cid, [0.0, {}])
            entry[0] += 1.0 / (RRF_K + rank)
            entry[1][name] = (rank, score)
    best = sorted(fused.items(), key=lambda e: (-e[1][0], min(r for r, _ in e[1][1].values())))
    return [(cid, score, seen) for cid, (score, seen) in best[:k]]
