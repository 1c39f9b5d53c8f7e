"""An n-gram index over training data (a curated dataset or token shards), for contamination checks.

Text is lowercased, punctuation stripped and split on whitespace; each window of n words (13 by default, as in
the GPT-3 and Llama contamination studies) is hashed to 64 bits. For token shards the windows are over token ids,
within documents. The index is a sorted array of unique hashes (`ngrams-<n>.npy`) with `ngrams-<n>.json`
beside it; the contamination check (contamination.py) asks it what fraction of a benchmark item's n-grams occur
in the training data. It lives in the evaluation stage because it reads both the dataset and the token shards.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ..data.dataset import MANIFEST, is_dataset, read_dataset
from ..errors import FmkitError
from ..workspace import locate

_STRIP = re.compile(r"[^\w\s]|_")
_MULT = np.uint64(0x9E3779B97F4A7C15)


def words(text: str) -> list[str]:
    return _STRIP.sub(" ", text.lower()).split()


def _word_ids(ws: list[str], cache: dict) -> np.ndarray:
    out = np.empty(len(ws), dtype=np.uint64)
    for i, w in enumerate(ws):
        h = cache.get(w)
        if h is None:
            h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        out[i] = h
    return out


def window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every window of n consecutive ids (polynomial, wrapping arithmetic)."""
    ids = ids.astype(np.uint64)
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        for k in range(n):
            h = h * _MULT + ids[k:len(ids) - n + 1 + k] + np.uint64(k + 1)
    return h


class NGramIndex:
    def __init__(self, hashes: np.ndarray, n: int, meta: dict | None = None):
        self.hashes, self.n, self.meta = hashes, n, meta or {}
        self._cache: dict = {}

    @classmethod
    def load(cls, path: str | Path, n: int = 13) -> "NGramIndex":
        p = Path(path)
        if p.is_dir():
            p = p / f"ngrams-{n}.npy"
        if not p.is_file():
            raise FmkitError(f"no {n}-gram index at {p}; build one with: fmkit curate ngrams DATASET --n {n}")
        meta = json.loads(p.with_suffix(".json").read_text()) if p.with_suffix(".json").is_file() else {}
        return cls(np.load(p), int(meta.get("n", n)), meta)

    def item_hashes(self, text: str) -> np.ndarray:
        if self.meta.get("unit") == "tokens":
            raise FmkitError("this index is over token ids: pass token ids to overlap_ids()")
        return window_hashes(_word_ids(words(text), self._cache), self.n)

    def _hits(self, h: np.ndarray) -> np.ndarray:
        if not len(h) or not len(self.hashes):
            return np.zeros(len(h), dtype=bool)
        pos = np.searchsorted(self.hashes, h).clip(max=len(self.hashes) - 1)
        return self.hashes[pos] == h

    def overlap(self, text: str) -> tuple[int, int]:
        """(n-grams of `text` found in the training data, n-grams in `text`)."""
        h = self.item_hashes(text)
        return int(self._hits(h).sum()), len(h)

    def overlap_ids(self, ids) -> tuple[int, int]:
        h = window_hashes(np.asarray(ids), self.n)
        return int(self._hits(h).sum()), len(h)


def build_ngram_index(source: str | Path, n: int = 13, out: str | Path | None = None,
                      workspace: str | Path | None = None) -> Path:
    """Index the n-grams of a dataset (words) or of token shards (token ids), for contamination checks.

    Returns the .npy path (default: ngrams-N.npy inside the source folder); fmkit eval finds it from a model's
    lineage.

    Args:
        source: A curated dataset or token-shards folder, or its name in the workspace's datasets/ or shards/.
        n: Words (or tokens) per n-gram.
        out: Where to write the index (default: ngrams-N.npy in the source folder).
        workspace: Workspace folder where a bare dataset or shards name is looked up.
    """
    src = locate(source, "datasets", workspace)
    src = src if src.exists() else locate(source, "shards", workspace)
    chunks, docs = [], 0
    if is_dataset(src):
        unit, cache = "words", {}
        for row in read_dataset(src, columns=("text",)):
            docs += 1
            chunks.append(np.unique(window_hashes(_word_ids(words(row["text"]), cache), n)))
    elif (src / "index.json").is_file():
        from ..tokenize.shards import TokenShards

        unit = "tokens"
        reader = TokenShards(src)
        for doc_ids in reader.documents():
            docs += 1
            chunks.append(np.unique(window_hashes(doc_ids, n)))
    else:
        raise FmkitError(f"{src} is neither a curated dataset ({MANIFEST}) nor token shards (index.json)")
    hashes = np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.uint64)
    folder = Path(out) if out else src
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ngrams-{n}.npy"
    np.save(path, hashes)
    path.with_suffix(".json").write_text(json.dumps({"n": n, "unit": unit, "source": str(src), "documents": docs,
                                                     "ngrams": int(len(hashes))}, indent=1))
    return path
