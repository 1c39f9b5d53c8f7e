"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash LSH over word 5-grams, verified).

Signatures are computed per document where the filters run (in the workers); clustering happens once over all
signatures. Text is normalised as in datatrove (lowercase, punctuation removed, numbers replaced by 0, diacritics
stripped, whitespace collapsed) and cut into word 5-gram shingles. MinHash itself comes from `rensa` (Rust).

LSH only proposes candidates; the exact Jaccard of the shingle sets decides. datatrove's 14 bands x 8 rows puts
the 50% detection point near Jaccard 0.72, so pairs at 0.70-0.85 are found only ~80-90% of the time, and its
union of every bucket chains documents that are far from the one kept. Here 28 bands x 4 rows (the same 112
permutations) proposes a pair at Jaccard 0.7 with probability 0.9995; the extra candidates this brings below
the cut are rejected exactly, and a document is removed only when its own Jaccard with its cluster's survivor
is at least `jaccard` (0.7), never through a chain. The price: when clustering, the candidates' texts are read
and shingled once more and their shingle sets held in memory together (a few seconds for 20 MB of candidates).

The survivor of every cluster is the document that comes first in input order (source order in the recipe, then
file order, then position in the file), so the result does not depend on the number of workers or on timing. The
cluster id is the survivor's id.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_PUNCT = re.compile(r"[^\w\s]|_")
_NUMBERS = re.compile(r"\d+(?:[.,]\d+)?")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_ASCII_PUNCT = str.maketrans({chr(c): " " for c in range(128) if not (chr(c).isalnum() or chr(c).isspace())})


def normalize(text: str) -> str:
    """datatrove's order: lowercase, numbers (with a decimal part) to 0, punctuation to spaces, whitespace
    collapsed, diacritics stripped."""
    return " ".join(words(text))


def words(text: str) -> list[str]:
    """The words of the normalised text (`normalize` is them joined by single spaces)."""
    text = _NUMBERS.sub("0", text.lower())
    if text.isascii():   # most text: punctuation to spaces by table, ~3x faster than the regex
        return text.translate(_ASCII_PUNCT).split()
    # only the non-ASCII runs are looked at character by character: a Python loop over every character of a text
    # with one accented letter was the largest cost of near-dedup
    return _NON_ASCII.sub(_strip_marks, unicodedata.normalize("NFD", _PUNCT.sub(" ", text))).split()


def _strip_marks(run: re.Match) -> str:
    return "".join(c for c in run.group() if unicodedata.category(c) != "Mn")


def exact_hash(text: str) -> int:
    """64-bit hash of the normalised text (signed, to fit Parquet int64)."""
    return int.from_bytes(hashlib.blake2b(normalize(text).encode(), digest_size=8).digest(), "little", signed=True)


@dataclass
class MinHashConfig:
    ngram: int = 5
    bands: int = 28
    rows: int = 4
    seed: int = 1
    jaccard: float = 0.7        # exact word n-gram Jaccard with the survivor at or above which a document goes

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def threshold(self) -> float:
        """The Jaccard similarity at which LSH proposes a pair with probability ~50%."""
        return (1 / self.bands) ** (1 / self.rows)


def shingles(text: str, n: int) -> list[str]:
    ws = words(text)
    if len(ws) < n:
        return [" ".join(ws)] if ws else []
    return [" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)]


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


def shingle_set(text: str, n: int) -> np.ndarray:
    """The distinct word n-gram shingles of `text` as sorted 64-bit hashes (compact, and fast to intersect).

    A shingle's hash is combined from its words' hashes in numpy, without building its string: the same sets as
    hashing the joined shingles (up to 64-bit collisions), at a fraction of the cost. Python's string hash is
    salted per process, which is fine for sets compared within one process."""
    ws = words(text)
    if len(ws) < n:
        return np.unique(np.array([hash(" ".join(ws))] if ws else [], dtype=np.int64))
    w = np.fromiter(map(hash, ws), dtype=np.int64, count=len(ws)).view(np.uint64)
    m = len(w) - n + 1
    h = w[:m].copy()
    for k in range(1, n):   # wraps modulo 2**64, as intended
        h = h * np.uint64(0x100000001B3) + w[k:k + m]
    return np.unique(h.view(np.int64))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two `shingle_set`s."""
    if not len(a) or not len(b):
        return 0.0
    both = len(np.intersect1d(a, b, assume_unique=True))
    return both / (len(a) + len(b) - both)


def exact_clusters(hashes: np.ndarray) -> np.ndarray:
    """For documents in input order, the index of the first document with the same hash (itself if unique)."""
    first: dict[int, int] = {}
    return np.array([first.setdefault(int(h), i) for i, h in enumerate(hashes)], dtype=np.int64)


def _buckets(sigs: np.ndarray, cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """(bucket id, shared) per band and document: ids unique across bands; shared where another document has it."""
    n = len(sigs)
    ids = np.empty((cfg.bands, n), dtype=np.int64)
    shared = np.zeros((cfg.bands, n), dtype=bool)
    for b in range(cfg.bands):
        band = np.ascontiguousarray(sigs[:, b * cfg.rows:(b + 1) * cfg.rows])
        keys = band.view(np.dtype((np.void, band.dtype.itemsize * cfg.rows))).ravel()
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        ids[b] = inverse.ravel() + b * n
        shared[b] = counts[inverse.ravel()] > 1
    return ids, shared


def minhash_clusters(sigs: np.ndarray, cfg: MinHashConfig, texts: Callable[[np.ndarray], Sequence[str]],
                     skip: np.ndarray | None = None) -> np.ndarray:
    """Each document's cluster root index: the earliest survivor that shares an LSH band with it, or with a member
    of its cluster, and whose exact Jaccard with it is at least `cfg.jaccard`; itself when there is none.

    `texts(indices)` returns those documents' texts; only LSH candidates are read. Documents with `skip` set
    (already removed, e.g. exact duplicates) and empty signatures take no part.
    """
    n = len(sigs)
    root = np.arange(n, dtype=np.int64)
    active = np.ones(n, dtype=bool) if skip is None else ~skip
    active &= ~(sigs == np.iinfo(np.uint32).max).all(axis=1)
    idx = np.flatnonzero(active)
    if not len(idx):
        return root
    ids, shared = _buckets(sigs[idx], cfg)
    cand = np.flatnonzero(shared.any(axis=0))          # positions in idx, ascending: input order
    sets = dict(zip(idx[cand].tolist(), (shingle_set(t, cfg.ngram) for t in texts(idx[cand]))))
    survivors_in: dict[int, list[int]] = {}             # bucket -> survivors of the documents seen in it
    for p in cand.tolist():
        j = int(idx[p])
        buckets = ids[shared[:, p], p].tolist()
        proposed = sorted({r for bucket in buckets for r in survivors_in.get(bucket, ())})
        # Compared with the survivor itself, not with the member that shares the bucket: no chains.
        root[j] = next((r for r in proposed if jaccard(sets[r], sets[j]) >= cfg.jaccard), j)
        for bucket in buckets:
            kept = survivors_in.setdefault(bucket, [])
            if root[j] not in kept:
                kept.append(int(root[j]))
    return root
