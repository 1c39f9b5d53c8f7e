"""One `Model` interface over local models (any model reference), OpenAI-compatible HTTP endpoints and Anthropic."""
from .backends import get_model
from .base import GenRequest, Model, Usage

__all__ = ["Model", "GenRequest", "Usage", "get_model"]
