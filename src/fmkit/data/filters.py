"""Quality filters as small blocks: Gopher quality and repetition, C4, and a code-aware set for source files.

Each block looks at one document and returns the reason it drops it, or None to keep it; a block may also rewrite
the text (C4 drops lines). Definitions and defaults follow datatrove's filters of the same names (which follow the
Gopher and C4 papers), so thresholds carry over; the code set follows BigCode's StarCoder data filters.
"""
from __future__ import annotations

import re
import string
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field

PUNCTUATION = set(string.punctuation + "«»‹›“”‘’„‚…–—·•¿¡")
# Words: runs of letters/digits (with inner apostrophes), or single punctuation marks, like a treebank tokenizer.
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_SENTENCE_RE = re.compile(r"[^.!?]+(?:[.!?]+|$)")


def split_words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


@dataclass
class Block(ABC):
    """A pipeline step (subclasses define `__call__`). `applies_to` picks documents by kind: text, code or all."""
    applies_to: str = "all"
    name = "block"

    def params(self) -> dict:
        return {k: (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in vars(self).items()}

    @abstractmethod
    def __call__(self, doc) -> str | None:
        """The reason to drop `doc`, or None to keep it."""


GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclass
class GopherQuality(Block):
    applies_to: str = "text"
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list = field(default_factory=lambda: list(GOPHER_STOP_WORDS))
    name = "gopher_quality"

    def __post_init__(self):
        self._stop = frozenset(self.stop_words)

    def params(self) -> dict:
        return {k: v for k, v in super().params().items() if not k.startswith("_")}

    def __call__(self, doc) -> str | None:
        text = doc.text
        words = split_words(text)
        n_words = len(words)
        non_symbol = [w for w in words if not (len(w) == 1 and w in PUNCTUATION)]
        n = len(non_symbol)
        if n < self.min_doc_words:
            return "gopher_short_doc"
        if n > self.max_doc_words:
            return "gopher_long_doc"
        avg = sum(map(len, non_symbol)) / n
        if avg < self.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if avg > self.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if text.count("#") / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > self.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        ellipsis_end = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if ellipsis_end / len(lines) > self.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        alpha = sum(1 for w in words if any(c.isalpha() for c in w))
        if alpha / n_words < self.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if len(self._stop.intersection(words)) < self.min_stop_words:  # distinct stop words, case-sensitive
            return "gopher_enough_stop_words"
        return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, characters in them)."""
    seen, dup_items, dup_chars = set(), 0, 0
    for x in items:
        if x in seen:
            dup_items += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup_items, dup_chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram: its length times its count."""
    if len(words) < n:
        return 0
    grams = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def _duplicated_ngram_chars(words: list[str], n: int) -> int:
    """Characters in n-grams that repeat an earlier n-gram, scanning left to right without overlapping repeats."""
    seen, repeated, i = set(), 0, 0
    while i < len(words) - n + 1:
        gram = "".join(words[i:i + n])
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


@dataclass
class GopherRepetition(Block):
    applies_to: str = "text"
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: list = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    dup_n_grams: list = field(default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11],
                                                       [10, 0.10]])
    name = "gopher_repetition"

    def __call__(self, doc) -> str | None:
        text = doc.text
        if not text:
            return "empty"
        paragraphs = _PARAGRAPHS.split(text.strip())
        dup, chars = _duplicates(paragraphs)
        if paragraphs and dup / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        dup, chars = _duplicates(lines)
        if lines and dup / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if chars / len(text) > self.dup_line_char_frac:
            return "dup_line_char_frac"
        words = split_words(text)
        for n, frac in self.top_n_grams:
            if _top_ngram_chars(words, int(n)) / len(text) > frac:
                return f"top_{int(n)}_gram"
        for n, frac in self.dup_n_grams:
            if _duplicated_ngram_chars(words, int(n)) / len(text) > frac:
                return f"duplicated_{int(n)}_n_grams"
        return None


C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                        "use cookies")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")


@dataclass
class C4Quality(Block):
    """C4's rules: drop lines without terminal punctuation, with few words, JavaScript or policy notices; drop the
    document for lorem ipsum, a curly bracket, or too few sentences left."""
    applies_to: str = "text"
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    name = "c4"

    def __call__(self, doc) -> str | None:
        lines = doc.text.splitlines() if self.split_paragraph else _SENTENCE_RE.findall(doc.text)
        kept, sentences, removed = [], 0, Counter()
        for line in lines:
            line = line.strip()
            words = line.split()
            if self.max_word_length != -1 and any(len(w) > self.max_word_length for w in words):
                removed["too_long_word"] += 1
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
                removed["no_terminal_punct"] += 1
                continue
            if len(words) < self.min_words_per_line:
                removed["too_few_words"] += 1
                continue
            low = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in low:
                return "lorem_ipsum"
            if self.filter_javascript and "javascript" in low:
                removed["javascript"] += 1
                continue
            if self.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if self.filter_policy and any(p in low for p in C4_POLICY_SUBSTRINGS):
                removed["policy"] += 1
                continue
            if self.min_num_sentences != -1:
                sentences += len(_SENTENCE_RE.findall(line)) if self.split_paragraph else 1
            kept.append(line)
        if sentences < self.min_num_sentences:
            return "too_few_sentences"
        doc.text = ("\n" if self.split_paragraph else " ").join(kept).strip()
        doc.counts.update({f"c4_lines_removed_{k}": v for k, v in removed.items()})
        return None


AUTOGEN_MARKERS = ("auto-generated", "autogenerated", "automatically generated", "generated by", "do not edit",
                   "generated from")


@dataclass
class CodeQuality(Block):
    """Source files: drop minified or data-like files (very long lines, little alphanumeric text) and files that
    say they were generated by a tool in their first lines."""
    applies_to: str = "code"
    max_line_length: int = 1000
    max_mean_line_length: float = 100
    min_alnum_fraction: float = 0.25
    autogen_lines: int = 5
    autogen_markers: list = field(default_factory=lambda: list(AUTOGEN_MARKERS))
    name = "code"

    def __call__(self, doc) -> str | None:
        text = doc.text
        lines = text.splitlines() or [""]
        if max(map(len, lines)) > self.max_line_length:
            return "code_max_line_length"
        if sum(map(len, lines)) / len(lines) > self.max_mean_line_length:
            return "code_mean_line_length"
        if sum(c.isalnum() for c in text) / max(len(text), 1) < self.min_alnum_fraction:
            return "code_alnum_fraction"
        head = "\n".join(lines[:self.autogen_lines]).lower()
        if any(m in head for m in self.autogen_markers):
            return "code_autogenerated"
        return None
