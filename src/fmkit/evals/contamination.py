"""Is a benchmark item in the model's training data? Checked when the model's lineage names its data.

Two tests per item (prompt plus gold answer), as in the GPT-3 / Llama 2 contamination studies: any 13-gram of
words (lowercased, punctuation stripped) found in the training dataset, or any 50-character run (lowercased,
whitespace collapsed, starting at a word) found verbatim. For models whose training data is unknown, Min-K% prob
(Shi et al. 2023: the mean log-probability of the item's least likely 20% of tokens; higher means more likely
seen) is recorded as a signal instead.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ..data.dataset import is_dataset, read_dataset
from .ngrams import NGramIndex, build_ngram_index

_WS = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def _substring_hashes(text: str, width: int = 50) -> np.ndarray:
    t = _norm(text)
    starts = [0] + [m.end() for m in re.finditer(" ", t)]
    out = [int.from_bytes(hashlib.blake2b(t[s:s + width].encode(), digest_size=8).digest(), "little")
           for s in starts if s + width <= len(t)]
    return np.array(out, dtype=np.uint64)


def training_dataset(lineage: dict) -> Path | None:
    """The curated dataset folder a model was trained on, when its fmkit.json lineage names one."""
    p = lineage.get("dataset")
    if p and is_dataset(p):
        return Path(p)
    shards = lineage.get("shards")
    if shards and (Path(shards) / "index.json").is_file():
        src = json.loads((Path(shards) / "index.json").read_text()).get("source", "")
        if src and is_dataset(src):
            return Path(src)
    return None


class ContaminationChecker:
    def __init__(self, dataset: Path, n: int = 13, width: int = 50):
        self.dataset, self.width = Path(dataset), width
        npy = self.dataset / f"ngrams-{n}.npy"
        self.ngrams = NGramIndex.load(npy if npy.is_file() else build_ngram_index(self.dataset, n))
        sub = self.dataset / f"substrings-{width}.npy"
        if not sub.is_file():
            parts = [np.unique(_substring_hashes(r["text"], width)) for r in read_dataset(self.dataset, ("text",))]
            np.save(sub, np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64))
        self.substrings = np.load(sub)

    def check(self, text: str) -> dict:
        hit, total = self.ngrams.overlap(text)
        h = _substring_hashes(text, self.width)
        sub_hits = 0
        if len(h) and len(self.substrings):
            pos = np.searchsorted(self.substrings, h).clip(max=len(self.substrings) - 1)
            sub_hits = int((self.substrings[pos] == h).sum())
        return {"ngram_hits": hit, "ngrams": total, "substring_hits": sub_hits,
                "contaminated": bool(hit or sub_hits)}


def min_k_prob(logprobs: list[float], k: float = 0.2) -> float:
    if not logprobs:
        return float("nan")
    lp = np.sort(np.asarray(logprobs))
    return float(lp[:max(1, int(len(lp) * k))].mean())
