"""Toxicity: a fast word-list score by default, and a hook for a classifier of the user's choice.

The score is the fraction of a document's words found in the list (a multi-word entry matches as a phrase). The
bundled list is short and English-only, meant as a floor; `words_file` points at a fuller one (one entry a line),
e.g. the LDNOOBW list C4 used. `classifier: "package.module:function"` calls `function(text) -> float in [0, 1]`
instead (a transformers pipeline wrapped in a function, say), dropping documents that score above `threshold`.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import FmkitError
from .filters import Block

_WORDS = re.compile(r"[a-z0-9']+")


def load_words(words_file: str = "") -> tuple[frozenset, tuple]:
    if words_file:
        p = Path(words_file)
        if not p.is_file():
            raise FmkitError(f"toxicity words_file not found: {p}")
        text = p.read_text(encoding="utf-8", errors="replace")
    else:
        text = (resources.files("fmkit") / "data" / "toxic_words.txt").read_text(encoding="utf-8")
    entries = [e.strip().lower() for e in text.splitlines() if e.strip() and not e.startswith("#")]
    return frozenset(e for e in entries if " " not in e), tuple(e for e in entries if " " in e)


@dataclass
class Toxicity(Block):
    applies_to: str = "all"
    threshold: float = 0.01       # drop when more than 1% of words are on the list
    min_hits: int = 2             # ... and at least this many hits, so one stray word in a short text is kept
    words_file: str = ""
    classifier: str = ""          # "module:function" returning a toxicity probability for a text
    name = "toxicity"

    def __post_init__(self):
        self._words, self._phrases = load_words(self.words_file)
        self._clf = None
        if self.classifier:
            mod, _, fn = self.classifier.partition(":")
            try:
                self._clf = getattr(importlib.import_module(mod), fn)
            except (ImportError, AttributeError, ValueError) as e:
                raise FmkitError(f"toxicity classifier '{self.classifier}' cannot be loaded: {e}") from None

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if not k.startswith("_")}

    def score(self, text: str) -> tuple[float, int]:
        low = text.lower()
        words = _WORDS.findall(low)
        hits = sum(1 for w in words if w in self._words) + sum(low.count(p) for p in self._phrases)
        return hits / max(len(words), 1), hits

    def __call__(self, doc) -> str | None:
        if self._clf is not None:
            if float(self._clf(doc.text)) > self.threshold:
                return "toxicity_classifier"
            return None
        score, hits = self.score(doc.text)
        if hits >= self.min_hits and score > self.threshold:
            return "toxicity_wordlist"
        return None
