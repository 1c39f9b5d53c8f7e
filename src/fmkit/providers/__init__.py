"""One `Model` interface over local Hugging Face-format folders, OpenAI-compatible HTTP endpoints and Anthropic."""
from .base import GenRequest, Model, Usage, get_model

__all__ = ["Model", "GenRequest", "Usage", "get_model"]
