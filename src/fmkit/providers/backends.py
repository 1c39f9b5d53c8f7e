"""The backend table: which `Model` class serves a model reference, and `get_model(ref)`.

Each backend is imported only when a reference names it, so the SDKs stay optional extras.
"""
from __future__ import annotations

from pathlib import Path

from ..models.reference import ModelRef, resolve
from .base import Model


def _local(ref: ModelRef, batch_size: int = 16, **kw) -> Model:
    from .local import LocalModel

    return LocalModel(ref, batch_size=batch_size, **kw)


def _openai(ref: ModelRef, **kw) -> Model:
    from .openai_api import OpenAIModel

    return OpenAIModel(ref.name, **kw)


def _anthropic(ref: ModelRef, **kw) -> Model:
    from .anthropic_api import AnthropicModel

    return AnthropicModel(ref.name, **kw)


BACKENDS = {"folder": _local, "adapter": _local, "hf": _local, "openai": _openai, "anthropic": _anthropic}


def get_model(ref: str | Path | ModelRef, base_url: str = "", api_key: str = "", cache: str | Path | None = None,
              concurrency: int = 4, batch_size: int = 16, prices: str | Path | None = None,
              base: str | Path | None = None, **kw) -> Model:
    """The `Model` for any reference (`fmkit.models.resolve`). `base_url`, `api_key`, `cache` (an SQLite file of
    responses), `concurrency` and `prices` apply to hosted backends; `batch_size`, `base` (an adapter's base) and
    `kw` (dtype, trust_pickle, ...) to local ones."""
    ref = resolve(ref, base)
    if ref.local:
        return BACKENDS[ref.kind](ref, batch_size=batch_size, **kw)
    return BACKENDS[ref.kind](ref, base_url=base_url, api_key=api_key, cache=cache, concurrency=concurrency,
                              prices=prices, **kw)
