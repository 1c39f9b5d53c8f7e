"""What the HTTP backends share: bounded concurrency, retries with exponential backoff, the cache, usage."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import FmkitError
from .base import Model
from .cache import ResponseCache
from .pricing import price_of


class RemoteModel(Model):
    provider = "remote"
    retryable: tuple = ()          # exception types worth retrying (rate limits, timeouts, 5xx)

    def __init__(self, model: str, cache: str | Path | None = None, concurrency: int = 4, max_retries: int = 5,
                 backoff: float = 1.0, prices: str | Path | None = None):
        super().__init__()
        self.model_name = model
        self.name = f"{self.provider}:{model}"
        self.cache = ResponseCache(cache) if cache else None
        self.concurrency = max(1, concurrency)
        self.max_retries = max_retries
        self.backoff = backoff
        self.price = price_of(self.provider, model, prices)

    def _call(self, fn, *args, **kwargs):
        """fn(*args) with retries on transient errors: waits backoff * 2^attempt (+ jitter), up to max_retries."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn(*args, **kwargs)
            except self.retryable as e:
                if attempt == self.max_retries:
                    at = f" at {self.base_url}" if getattr(self, "base_url", "") else ""
                    raise FmkitError(f"{self.name}{at}: giving up after {attempt + 1} attempts ({type(e).__name__}: "
                                     f"{str(e)[:200]})") from None
                time.sleep(self.backoff * 2 ** attempt * (1 + random.random() * 0.25))

    def _map(self, method: str, items: list, one, cacheable) -> list:
        """Run `one(item) -> (result, prompt_tokens, completion_tokens)` over items concurrently, via the cache."""
        def work(item):
            key = self.cache.key(self.name, method, item) if (self.cache and cacheable(item)) else None
            if key:
                hit = self.cache.get(key)
                if hit is not None:
                    with self._lock:
                        self.usage.cached += 1
                    return hit
            t = time.perf_counter()
            result, pt, ct = self._call(one, item)
            with self._lock:
                self.usage.add(pt, ct, self.price)
                self.usage.seconds += time.perf_counter() - t
            if key:
                self.cache.put(key, result)
            return result

        if self.concurrency == 1 or len(items) <= 1:
            return [work(i) for i in items]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(work, items))

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.provider, "model": self.model_name,
                "price_per_mtok": list(self.price)}


def cut_at_stop(text: str, until: list) -> str:
    hits = [text.index(s) for s in until if s and s in text]
    return text[:min(hits)] if hits else text
