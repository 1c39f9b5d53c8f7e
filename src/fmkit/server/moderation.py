"""/v1/moderations: OpenAI's categories scored by a lexicon, by a classifier where one is configured, and PII.

The lexicon (data/lexicon.py, shared with the red-team probes) is a deterministic floor, not a trained
classifier: a few weighted patterns per category that catch plain, explicit cases and leave look-alikes alone
(`kill the process`, `shoot a photo`, `the history of the bomb`), and miss anything subtler. What each category
covers:

- harassment: insults and demeaning language aimed at a person; harassment/threatening: threats against one.
- hate: dehumanising or hateful language about a group; hate/threatening: calls for violence against a group.
- illicit: help with wrongdoing (theft, fraud, break-ins, drugs); illicit/violent: weapons, explosives, hired
  violence.
- self-harm: depictions of self-harm; self-harm/intent: a speaker intending it; self-harm/instructions: ways to.
- sexual: explicit sexual content (not sex education); sexual/minors: anything sexual near a word for a minor.
- violence: violence against people; violence/graphic: gory descriptions of injury.
- pii (fmkit's own): personal data or secrets that data/pii.py would redact (emails, phones, cards, keys, ...);
  reported per input, and not counted in `flagged`, which keeps OpenAI's meaning of harmful content.

A sub-category's score also raises its parent's (and a threat's, violence's). `--moderation-model` names a text
classifier written by `fmkit classify` whose labels are category names; its probability for each such label is
taken where it is higher than the lexicon's.
"""
from __future__ import annotations

import uuid
from collections import Counter
from types import SimpleNamespace

from ..data.lexicon import CATEGORIES, THRESHOLD, Lexicon, raised
from ..data.pii import PLACEHOLDERS, PIIRedact
from ..errors import FmkitError
from . import protocol as P

MAX_INPUTS = 2048
_PII = PIIRedact()


def redact(text: str, counts: Counter | None = None) -> str:
    """`text` with PII replaced by data/pii.py's placeholders; each replacement counted by type in `counts`."""
    doc = SimpleNamespace(text=text, counts=Counter())
    _PII(doc)
    if counts is not None:
        counts.update({k.removeprefix("pii_"): v for k, v in doc.counts.items()})
    return doc.text


class Classifier:
    """A classifier folder from `fmkit classify`, loaded once; its probabilities for labels that are categories."""

    def __init__(self, ref: str, workspace=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..workspace import locate, read_manifest

        folder = locate(ref, "models", workspace)
        m = read_manifest(folder)
        if m.get("task") != "classification":
            raise FmkitError(f"--moderation-model {ref}: {folder} is not a classifier written by fmkit classify")
        self.labels, self.max_len = m["labels"], m.get("max_len", 256)
        if not set(self.labels) & set(CATEGORIES):
            raise FmkitError(f"--moderation-model {ref}: none of its labels ({', '.join(self.labels)}) is a "
                             f"moderation category ({', '.join(CATEGORIES)})")
        self.name = folder.name
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        if m["kind"] == "adapter":
            from peft import PeftModel

            base = AutoModelForSequenceClassification.from_pretrained(m["encoder"], num_labels=len(self.labels),
                                                                      use_safetensors=True)
            self.net = PeftModel.from_pretrained(base, str(folder)).eval()
        else:
            self.net = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True).eval()

    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        import torch

        with torch.inference_mode():
            enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
            probs = self.net(**enc).logits.float().softmax(-1).tolist()
        return [{lab: p for lab, p in zip(self.labels, row) if lab in CATEGORIES} for row in probs]


class Moderator:
    """Scores texts: the lexicon, then the classifier's probabilities where they are higher, then PII."""

    def __init__(self, classifier: Classifier | None = None, lexicon: str | None = None):
        self.lexicon = Lexicon(lexicon)
        self.classifier = classifier
        self.name = "fmkit-lexicon" + (f"+{classifier.name}" if classifier else "")

    def flags(self, text: str) -> set[str]:
        """The categories the lexicon alone flags in `text` (what the output policy checks as it streams)."""
        return self.lexicon.flags(text)

    def moderate(self, texts: list[str], run=lambda fn, *a: fn(*a)) -> list[dict]:
        """One OpenAI moderation result per text; `run` runs the classifier (on the server's compute thread)."""
        learned = run(self.classifier.probabilities, texts) if self.classifier else [{} for _ in texts]
        results = []
        for text, probs in zip(texts, learned):
            scores = self.lexicon.scores(text)
            for category, p in probs.items():
                scores[category] = max(scores[category], p)
            scores = {c: round(s, 6) for c, s in raised(scores).items()}
            found: Counter = Counter()
            redact(text, found)
            flags = {c: s >= THRESHOLD for c, s in scores.items()}
            results.append({
                "flagged": any(flags.values()),
                "categories": {**flags, "pii": bool(found)},
                "category_scores": {**scores, "pii": 1.0 if found else 0.0},
                "category_applied_input_types": {c: ["text"] for c in (*CATEGORIES, "pii")},
                "pii": {t: found[t] for t in PLACEHOLDERS if found[t]},
            })
        return results


def texts_of(body: dict) -> list[str]:
    """`input` as texts: a string or strings (one result each), or text parts (one result for all of them)."""
    P.unknown_fields(body, {"input", "model"})
    P.get(body, "model", (str,), None)
    value = P.get(body, "input", (str, list), P.REQUIRED)
    if isinstance(value, str):
        return [value]
    if not value:
        raise P.invalid("'input' must hold at least one item", "input", "empty_array")
    if len(value) > MAX_INPUTS:
        raise P.invalid(f"'input' takes at most {MAX_INPUTS} items, got {len(value)}", "input")
    if all(isinstance(v, str) for v in value):
        return list(value)
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            raise P.invalid(f"input[{i}]: image inputs are not supported; send text", f"input[{i}]",
                            "unsupported_value")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise P.invalid(f"input[{i}] must be a string or {{'type': 'text', 'text': ...}}, and all items of "
                            "one kind", f"input[{i}]", "invalid_type")
        texts.append(part["text"])
    return ["\n".join(texts)]


def moderations(moderator: Moderator, body: dict, run=lambda fn, *a: fn(*a)) -> dict:
    """The response to a checked /v1/moderations body; runs in a worker thread."""
    texts = texts_of(body)
    return {"id": f"modr-{uuid.uuid4().hex[:24]}", "model": moderator.name, "results": moderator.moderate(texts, run)}
