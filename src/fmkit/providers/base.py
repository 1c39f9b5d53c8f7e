"""The `Model` interface every backend implements, usage accounting, and `get_model(spec)`.

A backend offers some of: `loglikelihood` (log P(continuation | context) and whether it is the greedy
continuation), `generate` (a completion of a prompt, up to stop strings), `chat` (a reply to messages) and `embed`.
Asking for one it lacks fails with one sentence that suggests what to do instead.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

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

    def describe(self) -> dict:
        """What identifies this model in results (and its lineage, when known)."""
        return {"name": self.name, "backend": type(self).__name__}


def get_model(spec: str, base_url: str = "", api_key: str = "", cache: str | Path | None = None,
              concurrency: int = 4, batch_size: int = 16, prices: str | Path | None = None, **kw) -> Model:
    """A model from a spec: a folder path (local), `openai:NAME` (with base_url for a self-hosted server) or
    `anthropic:NAME`. `cache` names an SQLite file for responses of remote backends."""
    if spec.startswith("openai:"):
        from .openai_api import OpenAIModel

        return OpenAIModel(spec[7:], base_url=base_url, api_key=api_key, cache=cache, concurrency=concurrency,
                           prices=prices, **kw)
    if spec.startswith("anthropic:"):
        from .anthropic_api import AnthropicModel

        return AnthropicModel(spec[10:], api_key=api_key, base_url=base_url, cache=cache, concurrency=concurrency,
                              prices=prices, **kw)
    path = Path(spec)
    if not path.exists():
        raise FmkitError(f"model {spec} does not exist: give a model folder, openai:NAME or anthropic:NAME")
    from .local import LocalModel

    return LocalModel(path, batch_size=batch_size, **kw)
