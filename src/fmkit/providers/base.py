"""The `Model` interface every backend implements, and usage accounting (backends.py picks the backend).

A backend offers some of: `loglikelihood` (log P(continuation | context) and whether it is the greedy
continuation), `generate` (a completion of a prompt, up to stop strings), `chat` (a reply to messages) and `embed`.
Asking for one it lacks fails with one sentence that suggests what to do instead.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import FmkitError

ALTERNATIVE = {
    "loglikelihood": "score multiple choice by generation instead (task option `scoring: generate`), or use a "
                     "local model or a completions endpoint that returns prompt logprobs",
    "generate": "use `chat` with the prompt as the user message (task option `chat: true`)",
    "chat": "use `generate` on a plain prompt (task option `chat: false`)",
    "embed": "use a local encoder folder or an embeddings endpoint",
}


@dataclass
class GenRequest:
    prompt: str | list            # text, or chat messages [{"role", "content"}]
    until: list = field(default_factory=list)   # stop strings (not included in the output)
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0


@dataclass
class Usage:
    requests: int = 0
    cached: int = 0               # answered from the on-disk cache (no tokens billed)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0             # in the currency of the price table (USD by default)
    seconds: float = 0.0          # time spent in the backend

    def add(self, prompt_tokens: int = 0, completion_tokens: int = 0, price: tuple = (0.0, 0.0)) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost += prompt_tokens / 1e6 * price[0] + completion_tokens / 1e6 * price[1]


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness's split of a scored pair: the context's trailing whitespace moves to the continuation
    (a prompt ending "\n    " is tokenized with the answer's first word, so those tokens belong to the answer)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


class Model:
    """Base class: `name`, `capabilities`, `usage`, and the four methods (each may be unsupported)."""

    name = "model"
    capabilities: frozenset = frozenset()

    def __init__(self):
        self.usage = Usage()
        self._lock = threading.Lock()

    def unsupported(self, what: str):
        return FmkitError(f"{self.name} cannot do {what} (it offers: {', '.join(sorted(self.capabilities)) or 'nothing'}); "
                          f"{ALTERNATIVE[what]}")

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        """(log P(continuation | context), continuation is the greedy one, continuation tokens) per request."""
        raise self.unsupported("loglikelihood")

    def loglikelihood_rolling(self, texts: list[str]) -> list[tuple[float, int]]:
        """(total log-likelihood, tokens) of each whole text, for perplexity."""
        raise self.unsupported("loglikelihood")

    def generate(self, requests: list[GenRequest]) -> list[str]:
        raise self.unsupported("generate")

    def chat(self, requests: list[GenRequest]) -> list[str]:
        raise self.unsupported("chat")

    def embed(self, texts: list[str]):
        raise self.unsupported("embed")

    def stream(self, request: GenRequest) -> Iterator[str]:
        """The reply to one request in pieces as they are made (chat for messages, generate for text); a backend
        that cannot stream yields the whole reply once."""
        yield (self.chat if isinstance(request.prompt, list) else self.generate)([request])[0]

    def describe(self) -> dict:
        """What identifies this model in results (and its lineage, when known)."""
        return {"name": self.name, "backend": type(self).__name__}
