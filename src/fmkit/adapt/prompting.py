"""Prompting, the first rung of adaptation: Jinja templates, zero- and few-shot with example selection, and
parsing of the model's output.

    p = PromptTemplate("Docstring: {{doc}}\\nFunction name:", answer="{{name}}", examples=train_rows, k=3,
                       select="nearest", embed=model.embed)
    prompt = p.render({"doc": "Return the square root of x."})
    name = parse(output, regex=r"\\s*(\\w+)")

Few-shot examples are chosen at random with a seed (the same for every query) or as the k nearest to the query by
embedding cosine similarity (any `embed(texts) -> array` works: a local model, an embeddings endpoint, MiniLM).
"""
from __future__ import annotations

import json
import random
import re

import numpy as np

from ..errors import FmkitError


class PromptTemplate:
    def __init__(self, template: str, answer: str = "", examples: list[dict] | None = None, k: int = 0,
                 select: str = "random", seed: int = 0, embed=None, separator: str = "\n\n", instructions: str = ""):
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            self.template, self.answer = env.from_string(template), env.from_string(answer) if answer else None
        except jinja2.TemplateSyntaxError as e:
            raise FmkitError(f"prompt template is not valid Jinja: {e}") from None
        if select not in ("random", "nearest"):
            raise FmkitError(f"example selection must be random or nearest, got '{select}'")
        if k and not examples:
            raise FmkitError("few-shot prompting needs examples")
        if k and answer == "":
            raise FmkitError("few-shot prompting needs an answer template to show each example's answer")
        if select == "nearest" and k and embed is None:
            raise FmkitError("nearest-example selection needs an embed function (texts -> vectors)")
        self.examples, self.k, self.select, self.seed = examples or [], k, select, seed
        self.embed, self.separator, self.instructions = embed, separator, instructions
        self._vectors = None

    def _text(self, row: dict) -> str:
        try:
            return self.template.render(**row)
        except Exception as e:
            raise FmkitError(f"prompt template failed on {json.dumps(row)[:120]}: {e}") from None

    def choose(self, query: dict) -> list[dict]:
        if not self.k:
            return []
        pool = [e for e in self.examples if e != query]
        if self.select == "random":
            return random.Random(self.seed).sample(pool, min(self.k, len(pool)))
        if self._vectors is None:
            self._vectors = np.asarray(self.embed([self._text(e) for e in self.examples]), dtype=np.float32)
            self._vectors /= np.linalg.norm(self._vectors, axis=1, keepdims=True) + 1e-12
        q = np.asarray(self.embed([self._text(query)]), dtype=np.float32)[0]
        sims = self._vectors @ (q / (np.linalg.norm(q) + 1e-12))
        order = [i for i in np.argsort(-sims, kind="stable") if self.examples[i] != query]
        return [self.examples[i] for i in order[:self.k]][::-1]   # the most similar example sits last, nearest the query

    def render(self, query: dict) -> str:
        shots = [self._text(e) + self.answer.render(**e) for e in self.choose(query)] if self.answer else []
        parts = ([self.instructions] if self.instructions else []) + shots + [self._text(query)]
        return self.separator.join(parts)


def parse(output: str, regex: str = "", choices: list[str] | None = None, as_json: bool = False,
          default=None):
    """Pull the answer out of a generation: the first regex group, the first of `choices` mentioned, or the first
    JSON object; `default` when nothing matches (callers count those)."""
    if as_json:
        start = output.find("{")
        while start != -1:
            for end in range(len(output), start, -1):
                try:
                    return json.loads(output[start:end])
                except json.JSONDecodeError:
                    continue
            start = output.find("{", start + 1)
        return default
    if regex:
        m = re.search(regex, output)
        return (m.group(1) if m.groups() else m.group(0)) if m else default
    if choices:
        hits = []
        for c in choices:   # whole words only: choice "A" is not found inside "answer"
            m = re.search(rf"(?<!\w){re.escape(c)}(?!\w)", output, flags=re.I)
            if m:
                hits.append((m.start(), c))
        return min(hits)[1] if hits else default
    return output.strip()
