"""Any OpenAI-compatible HTTP endpoint through the `openai` SDK: OpenAI itself, vLLM, fmkit's own server, ...

chat -> /v1/chat/completions; generate -> /v1/completions; loglikelihood -> /v1/completions with echo and
logprobs (the prompt's own token log-probabilities; servers that cannot echo them get a one-line suggestion).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

from ..errors import FmkitError
from .base import GenRequest, split_pair
from .remote import RemoteModel, cut_at_stop


class OpenAIModel(RemoteModel):
    provider = "openai"
    capabilities = frozenset({"chat", "generate", "loglikelihood", "embed"})

    def __init__(self, model: str, base_url: str = "", api_key: str = "", timeout: float = 120.0, **kw):
        try:
            import openai
        except ImportError:
            raise FmkitError("the openai backend needs the openai package: pip install openai") from None
        super().__init__(model, **kw)
        self.retryable = (openai.RateLimitError, openai.APIConnectionError, openai.APITimeoutError,
                          openai.InternalServerError)
        self._openai = openai
        key = api_key or os.environ.get("OPENAI_API_KEY") or ("none" if base_url else "")
        if not key:
            raise FmkitError("no API key for openai: set OPENAI_API_KEY, or pass --base-url for a self-hosted server")
        self.client = openai.OpenAI(api_key=key, base_url=base_url or None, max_retries=0, timeout=timeout)
        self.base_url = base_url

    def describe(self) -> dict:
        return {**super().describe(), "base_url": self.base_url or "https://api.openai.com/v1"}

    def _fail(self, what: str, e: Exception):
        status, code = getattr(e, "status_code", None), getattr(e, "code", None)
        said = str(e)[:200]
        if status == 401:
            return FmkitError(f"{self.name}: the server refused the key ({said}); pass --api-key or set "
                              "OPENAI_API_KEY")
        if code == "model_not_found":
            return FmkitError(f"{self.name}: {said}")
        if status == 404 and self.base_url and not self.base_url.rstrip("/").endswith("/v1"):
            return FmkitError(f"{self.name}: {what} request got 404 from {self.base_url} ({said}); OpenAI-style "
                              f"servers answer under /v1: --base-url {self.base_url.rstrip('/')}/v1")
        if status in (400, 404, 405, 422, 501) and what in ALT:
            return FmkitError(f"{self.name} rejected a {what} request ({status}: {said[:160]}); {ALT[what]}")
        return FmkitError(f"{self.name}: {what} request failed ({type(e).__name__}: {said})")

    def chat(self, requests: list[GenRequest]) -> list[str]:
        def one(r: GenRequest):
            messages = r.prompt if isinstance(r.prompt, list) else [{"role": "user", "content": r.prompt}]
            try:
                resp = self.client.chat.completions.create(
                    model=self.model_name, messages=messages, max_tokens=r.max_tokens, temperature=r.temperature,
                    seed=r.seed, **({"stop": r.until[:4]} if r.until else {}))
            except self.retryable:
                raise
            except self._openai.APIError as e:
                raise self._fail("chat", e) from None
            text = cut_at_stop(resp.choices[0].message.content or "", r.until)
            u = resp.usage
            return text, (u.prompt_tokens if u else 0), (u.completion_tokens if u else 0)
        return self._map("chat", requests, one, lambda r: r.temperature == 0)

    def generate(self, requests: list[GenRequest]) -> list[str]:
        def one(r: GenRequest):
            if not isinstance(r.prompt, str):
                raise FmkitError("generate takes text prompts; chat messages go to chat()")
            try:
                resp = self.client.completions.create(
                    model=self.model_name, prompt=r.prompt, max_tokens=r.max_tokens, temperature=r.temperature,
                    seed=r.seed, **({"stop": r.until[:4]} if r.until else {}))
            except self.retryable:
                raise
            except self._openai.APIError as e:
                raise self._fail("generate", e) from None
            u = resp.usage
            return cut_at_stop(resp.choices[0].text, r.until), (u.prompt_tokens if u else 0), \
                (u.completion_tokens if u else 0)
        return self._map("generate", requests, one, lambda r: r.temperature == 0)

    def stream(self, request: GenRequest) -> Iterator[str]:
        """The reply in pieces as the server sends them (chat for messages, completions for text); retried like
        any request until the first piece, counted in usage when the server reports it."""
        chat = isinstance(request.prompt, list)
        create = self.client.chat.completions.create if chat else self.client.completions.create
        text = {"messages": request.prompt} if chat else {"prompt": request.prompt}
        t = time.perf_counter()
        try:
            chunks = self._call(create, model=self.model_name, max_tokens=request.max_tokens, stream=True,
                                temperature=request.temperature, seed=request.seed, **text,
                                stream_options={"include_usage": True},
                                **({"stop": request.until[:4]} if request.until else {}))
            usage = None
            for chunk in chunks:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    piece = (choice.delta.content if chat else choice.text) or ""
                    if piece:
                        yield piece
        except self._openai.APIError as e:
            raise self._fail("chat" if chat else "generate", e) from None
        with self._lock:
            self.usage.add(usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, self.price)
            self.usage.seconds += time.perf_counter() - t

    def embed(self, texts: list[str]):
        import numpy as np

        def one(text):
            try:
                resp = self.client.embeddings.create(model=self.model_name, input=text)
            except self.retryable:
                raise
            except self._openai.APIError as e:
                raise self._fail("embed", e) from None
            u = resp.usage
            return list(resp.data[0].embedding), (u.prompt_tokens if u else 0), 0
        return np.array(self._map("embed", list(texts), one, lambda t: True), dtype=np.float32)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        def one(req):
            ctx, cont = split_pair(*req)   # as local scoring splits it: the continuation's tokens start at ctx's end
            try:
                resp = self.client.completions.create(model=self.model_name, prompt=ctx + cont, max_tokens=1,
                                                      temperature=0, echo=True, logprobs=1)
            except self.retryable:
                raise
            except self._openai.APIError as e:
                raise self._fail("loglikelihood", e) from None
            lp = resp.choices[0].logprobs
            if lp is None or not lp.token_logprobs or lp.text_offset is None:
                raise FmkitError(f"{self.name} returned no prompt logprobs for an echo request; "
                                 f"{ALT['loglikelihood']}")
            ll, greedy, n = 0.0, True, 0
            end = len(ctx + cont)
            for i, (tok, off) in enumerate(zip(lp.tokens, lp.text_offset)):
                if len(ctx) <= off < end and lp.token_logprobs[i] is not None:
                    ll += lp.token_logprobs[i]
                    n += 1
                    top = (lp.top_logprobs or [None] * len(lp.tokens))[i] or {}
                    if top and max(top, key=top.get) != tok:
                        greedy = False
            if n == 0:
                raise FmkitError(f"{self.name}: continuation {cont!r} got no tokens of its own after context "
                                 f"{ctx[-40:]!r} (the server's tokens cross the boundary)")
            u = resp.usage
            return [ll, greedy, n], (u.prompt_tokens if u else 0), 0
        return [tuple(r) for r in self._map("loglikelihood", [list(r) for r in requests], one, lambda r: True)]


ALT = {
    "loglikelihood": "this endpoint does not return prompt log-probabilities; score multiple choice by generation "
                     "(task option `scoring: generate`)",
    "generate": "this endpoint has no /v1/completions; evaluate with `chat: true`",
    "chat": "this endpoint has no /v1/chat/completions; evaluate with `chat: false`",
    "embed": "this endpoint has no /v1/embeddings; use a local model folder for embeddings",
}
