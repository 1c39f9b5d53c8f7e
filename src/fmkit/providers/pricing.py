"""Price lookup from a user-editable YAML table (`prices.yaml` ships as the default)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from ..errors import FmkitError


def price_of(provider: str, model: str, table: str | Path | None = None) -> tuple[float, float]:
    """(USD per million input tokens, per million output tokens); (0, 0) for models not in the table."""
    if table:
        p = Path(table)
        if not p.is_file():
            raise FmkitError(f"price table {p} not found")
        text = p.read_text()
    else:
        text = (resources.files("fmkit") / "providers" / "prices.yaml").read_text()
    try:
        prices = (yaml.safe_load(text) or {}).get(provider, {}) or {}
    except yaml.YAMLError as e:
        raise FmkitError(f"price table {table} is not valid YAML: {str(e).splitlines()[0]}") from None
    if model in prices:
        return tuple(map(float, prices[model]))
    best = max((k for k in prices if model.startswith(k)), key=len, default=None)
    return tuple(map(float, prices[best])) if best else (0.0, 0.0)
