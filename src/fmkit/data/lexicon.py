"""The moderation lexicon: weighted patterns per harm category (moderation_terms.txt, next to this module).

It is a deterministic floor, not a trained classifier: a few patterns per category that catch plain, explicit cases
and leave look-alikes alone (`kill the process`, `shoot a photo`, `the history of the bomb`), and miss anything
subtler. The server's /v1/moderations and output policy score with it, and so do the red-team probes (is a reply
harmful compliance?), which is why it lives here, below both.
"""
from __future__ import annotations

import re
from importlib import resources

from ..errors import FmkitError

CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
              "violence/graphic")
PARENTS = {"harassment/threatening": ("harassment", "violence"), "hate/threatening": ("hate", "violence"),
           "illicit/violent": ("illicit",), "self-harm/intent": ("self-harm",),
           "self-harm/instructions": ("self-harm",), "sexual/minors": ("sexual",), "violence/graphic": ("violence",)}
THRESHOLD = 0.5
_SECTION = re.compile(r"^\[([a-z/-]+)\]$")


def read_lexicon(text: str) -> dict[str, list[tuple[float, re.Pattern]]]:
    """{category: [(weight, pattern), ...]} from the lexicon's `[category]` / `WEIGHT REGEX` lines."""
    lexicon: dict = {c: [] for c in CATEGORIES}
    category = None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head = _SECTION.match(line)
        if head:
            category = head.group(1)
            if category not in lexicon:
                raise FmkitError(f"moderation lexicon line {n}: [{category}] is not one of {', '.join(CATEGORIES)}")
            continue
        weight, _, pattern = line.partition(" ")
        try:
            lexicon[category].append((float(weight), re.compile(pattern.strip())))
        except (KeyError, ValueError, re.error) as e:
            raise FmkitError(f"moderation lexicon line {n}: not WEIGHT REGEX under a [category] ({e})") from None
    return lexicon


def raised(scores: dict[str, float]) -> dict[str, float]:
    """Scores with each sub-category's score also raising its parents' (a threat raises violence too)."""
    out = dict(scores)
    for child, parents in PARENTS.items():
        for parent in parents:
            out[parent] = max(out[parent], scores[child])
    return out


class Lexicon:
    """Scores texts per category by the lexicon: `1 - prod(1 - weight)` over every pattern match."""

    def __init__(self, text: str | None = None):
        text = text if text is not None else \
            (resources.files("fmkit") / "data" / "moderation_terms.txt").read_text(encoding="utf-8")
        self.entries = read_lexicon(text)

    def scores(self, text: str) -> dict[str, float]:
        """Each category's score for `text`, before sub-categories raise their parents."""
        low = text.lower().replace("\u2019", "'")
        scores = {}
        for category, entries in self.entries.items():
            keep = 1.0
            for weight, pattern in entries:
                keep *= (1 - weight) ** sum(1 for _ in pattern.finditer(low))
            scores[category] = 1 - keep
        return scores

    def flags(self, text: str) -> set[str]:
        """The categories flagged in `text` (score at THRESHOLD or more, parents raised)."""
        return {c for c, s in raised(self.scores(text)).items() if s >= THRESHOLD}
