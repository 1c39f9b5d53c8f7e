"""HELM-style input perturbations: robustness (lowercase, contractions, typos, extra spaces) and fairness
(counterfactual swaps of names and pronouns). Each is deterministic for a given text, so runs repeat exactly."""
from __future__ import annotations

import hashlib
import random
import re

CONTRACTIONS = {"do not": "don't", "does not": "doesn't", "did not": "didn't", "is not": "isn't",
                "are not": "aren't", "was not": "wasn't", "cannot": "can't", "will not": "won't", "it is": "it's",
                "that is": "that's", "there is": "there's", "they are": "they're", "we are": "we're",
                "you are": "you're", "i am": "i'm", "would not": "wouldn't", "should not": "shouldn't"}
PRONOUNS = {"he": "she", "she": "he", "him": "her", "his": "her", "her": "his", "himself": "herself",
            "herself": "himself", "man": "woman", "woman": "man", "men": "women", "women": "men",
            "boy": "girl", "girl": "boy", "father": "mother", "mother": "father", "son": "daughter",
            "daughter": "son", "brother": "sister", "sister": "brother"}
NAMES = {"John": "Aisha", "Aisha": "John", "Michael": "Mei", "Mei": "Michael", "James": "Priya", "Priya": "James",
         "David": "Fatima", "Fatima": "David", "Robert": "Lakisha", "Lakisha": "Robert", "Emily": "Jamal",
         "Jamal": "Emily", "Sarah": "Carlos", "Carlos": "Sarah", "Anna": "Kwame", "Kwame": "Anna"}


def _rng(text: str, name: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.blake2b(f"{name}:{text}".encode(), digest_size=8).digest(), "little"))


def _swap_words(text: str, table: dict, case_insensitive: bool) -> str:
    def repl(m):
        w = m.group(0)
        key = w.lower() if case_insensitive else w
        if key not in table:
            return w
        new = table[key]
        return new.capitalize() if case_insensitive and w[0].isupper() else new
    return re.sub(r"\b\w+\b", repl, text)


def lowercase(text: str) -> str:
    return text.lower()


def contractions(text: str) -> str:
    for full, short in CONTRACTIONS.items():
        text = re.sub(rf"\b{full}\b", lambda m, s=short: s[0].upper() + s[1:] if m.group(0)[0].isupper() else s,
                      text, flags=re.I)
    return text


def typos(text: str, rate: float = 0.05) -> str:
    """Swap two adjacent inner letters in about `rate` of the words longer than three letters."""
    rng = _rng(text, "typos")

    def repl(m):
        w = m.group(0)
        if len(w) > 3 and rng.random() < rate:
            i = rng.randrange(1, len(w) - 2)
            return w[:i] + w[i + 1] + w[i] + w[i + 2:]
        return w
    return re.sub(r"[A-Za-z]+", repl, text)


def extra_spaces(text: str) -> str:
    rng = _rng(text, "spaces")
    return re.sub(r"(?<=\S) (?=\S)", lambda m: " " * rng.randint(1, 3), text)


def pronouns(text: str) -> str:
    return _swap_words(text, PRONOUNS, True)


def names(text: str) -> str:
    return _swap_words(text, NAMES, False)


ROBUSTNESS = {"lowercase": lowercase, "contractions": contractions, "typos": typos, "extra_spaces": extra_spaces}
FAIRNESS = {"names": names, "pronouns": pronouns}
