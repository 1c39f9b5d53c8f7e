"""Anthropic through the `anthropic` SDK: chat only (the Messages API returns no log-probabilities)."""
from __future__ import annotations

import os

from ..errors import FmkitError
from .base import GenRequest
from .remote import RemoteModel, cut_at_stop


class AnthropicModel(RemoteModel):
    provider = "anthropic"
    capabilities = frozenset({"chat"})

    def __init__(self, model: str, api_key: str = "", base_url: str = "", timeout: float = 120.0, **kw):
        try:
            import anthropic
        except ImportError:
            raise FmkitError("the anthropic backend needs the anthropic package: pip install anthropic") from None
        super().__init__(model, **kw)
        self.retryable = (anthropic.RateLimitError, anthropic.APIConnectionError, anthropic.APITimeoutError,
                          anthropic.InternalServerError)
        self._anthropic = anthropic
        key = api_key or os.environ.get("ANTHROPIC_API_KEY", "")
        if not key:
            raise FmkitError("no API key for anthropic: set ANTHROPIC_API_KEY")
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url or None, max_retries=0, timeout=timeout)
        import inspect

        # newer SDKs dropped the `temperature` argument; it still travels in the request body
        self._temp_arg = "temperature" in inspect.signature(self.client.messages.create).parameters

    def chat(self, requests: list[GenRequest]) -> list[str]:
        def one(r: GenRequest):
            messages = r.prompt if isinstance(r.prompt, list) else [{"role": "user", "content": r.prompt}]
            system = "\n".join(m["content"] for m in messages if m["role"] == "system")
            rest = [m for m in messages if m["role"] != "system"]
            try:
                resp = self.client.messages.create(
                    model=self.model_name, messages=rest, max_tokens=r.max_tokens,
                    **({"temperature": r.temperature} if self._temp_arg else {"extra_body": {"temperature": r.temperature}}),
                    **({"system": system} if system else {}), **({"stop_sequences": r.until} if r.until else {}))
            except self.retryable:
                raise
            except self._anthropic.APIError as e:
                raise FmkitError(f"{self.name}: chat request failed ({type(e).__name__}: {str(e)[:200]})") from None
            text = "".join(b.text for b in resp.content if getattr(b, "type", "") == "text")
            return cut_at_stop(text, r.until), resp.usage.input_tokens, resp.usage.output_tokens
        return self._map("chat", requests, one, lambda r: r.temperature == 0)
