"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash LSH over word 5-grams).

Signatures are computed per document where the filters run (in the workers); clustering happens once over all
signatures. Defaults follow datatrove: text normalised (lowercase, punctuation removed, numbers replaced by 0,
diacritics stripped, whitespace collapsed), word 5-gram shingles, 14 bands x 8 rows = 112 permutations, which puts
the 50% detection point near Jaccard (1/14)^(1/8) = 0.72. MinHash itself comes from `rensa` (Rust).

The survivor of every cluster is the document that comes first in input order (source order in the recipe, then
file order, then position in the file), so the result does not depend on the number of workers or on timing. The
cluster id is the survivor's id.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

_PUNCT = re.compile(r"[^\w\s]|_")
_NUMBERS = re.compile(r"\d+(?:[.,]\d+)?")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """datatrove's order: lowercase, numbers (with a decimal part) to 0, punctuation to spaces, whitespace
    collapsed, diacritics stripped."""
    text = _NUMBERS.sub("0", text.lower())
    text = _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text


def exact_hash(text: str) -> int:
    """64-bit hash of the normalised text (signed, to fit Parquet int64)."""
    return int.from_bytes(hashlib.blake2b(normalize(text).encode(), digest_size=8).digest(), "little", signed=True)


@dataclass
class MinHashConfig:
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def threshold(self) -> float:
        """The Jaccard similarity at which a pair is found with probability ~50%."""
        return (1 / self.bands) ** (1 / self.rows)


def shingles(text: str, n: int) -> list[str]:
    words = normalize(text).split()
    if len(words) < n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def signatures(texts: list[str], cfg: MinHashConfig) -> np.ndarray:
    """MinHash signatures, one row of `num_perm` uint32 per text (all-ones for a text with no words)."""
    from rensa import RMinHash

    out = np.full((len(texts), cfg.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    for i, text in enumerate(texts):
        sh = shingles(text, cfg.ngram)
        if sh:
            m = RMinHash(num_perm=cfg.num_perm, seed=cfg.seed)
            m.update(sh)
            out[i] = m.digest()
    return out


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index (earlier in input order) becomes the root: the survivor
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


def exact_clusters(hashes: np.ndarray) -> np.ndarray:
    """For documents in input order, the index of the first document with the same hash (itself if unique)."""
    first: dict[int, int] = {}
    return np.array([first.setdefault(int(h), i) for i, h in enumerate(hashes)], dtype=np.int64)


def minhash_clusters(sigs: np.ndarray, cfg: MinHashConfig, skip: np.ndarray | None = None) -> np.ndarray:
    """Union documents sharing any LSH band; returns each document's cluster root (earliest member) index.

    Documents with `skip` set (already removed, e.g. exact duplicates) and empty signatures take no part.
    """
    n = len(sigs)
    uf = _UnionFind(n)
    active = np.ones(n, dtype=bool) if skip is None else ~skip
    active &= ~(sigs == np.iinfo(np.uint32).max).all(axis=1)
    idx = np.flatnonzero(active)
    if len(idx):
        for b in range(cfg.bands):
            band = np.ascontiguousarray(sigs[idx, b * cfg.rows:(b + 1) * cfg.rows])
            keys = band.view(np.dtype((np.void, band.dtype.itemsize * cfg.rows))).ravel()
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
            for j in same:  # consecutive equal keys: join neighbours, which chains the whole bucket
                uf.union(int(idx[order[j]]), int(idx[order[j + 1]]))
    return np.array([uf.find(i) for i in range(n)], dtype=np.int64)
