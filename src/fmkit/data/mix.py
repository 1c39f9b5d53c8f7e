"""Balancing domains: target token shares per domain, reached by down-sampling or repeating documents.

The total token count is kept: a domain with target share w and t of T tokens gets rate w*T/t. A rate below 1
keeps each document with that probability; above 1 repeats each floor(rate) times plus one more with the fraction's
probability. The coin for each document is a hash of (seed, id), so the choice is the same on every run and for any
number of workers. Domains missing from `weights` keep rate 1, and their share is taken off the top.
"""
from __future__ import annotations

import hashlib

import numpy as np


def mix_rates(tokens: dict[str, int], weights: dict[str, float]) -> dict[str, float]:
    if not weights:
        return {d: 1.0 for d in tokens}
    fixed = sum(t for d, t in tokens.items() if d not in weights)
    total = sum(tokens.values())
    wsum = sum(w for d, w in weights.items() if d in tokens) or 1.0
    budget = total - fixed
    return {d: (weights[d] / wsum * budget / t if d in weights and t else 1.0) for d, t in tokens.items()}


def _coin(seed: int, doc_id: str) -> float:
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def repeats(ids: list[str], rates: list[float], seed: int = 0) -> np.ndarray:
    """How many times each document appears in the output (0 = down-sampled away)."""
    out = np.empty(len(ids), dtype=np.int64)
    for i, (doc_id, r) in enumerate(zip(ids, rates)):
        whole = int(r)
        out[i] = whole + (1 if r > whole and _coin(seed, doc_id) < r - whole else 0)
    return out
