"""fmkit: the foundation-model lifecycle in one toolkit. The Python API mirrors the CLI verbs."""
import logging
import warnings

from .errors import FmkitError

__version__ = "0.1.0"

# bitsandbytes (imported by peft whenever it is installed) logs a hint to fetch CPU kernels from the hub; fmkit
# never downloads, and the built-in CPU path it falls back to is the one used
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft (0.21) still asks transformers for `is_gradient_checkpointing`, which v5 deprecates: noise for users of
# fmkit's verbs, nothing they can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)

__all__ = ["FmkitError", "quickstart", "curate", "curate_report", "build_ngram_index", "NGramIndex",
           "evaluate", "get_model", "finetune", "merge", "validate_jsonl",
           "train_tokenizer", "pack", "pretrain", "generate", "load_model",
           "Workspace"]


def __getattr__(name: str):
    # Lazy: `import fmkit` stays fast and does not import torch until a verb is used.
    if name == "quickstart":
        from .quickstart import quickstart
        return quickstart
    if name == "curate":
        from .data.curate import curate
        return curate
    if name == "curate_report":
        from .data.report import curate_report
        return curate_report
    if name in ("build_ngram_index", "NGramIndex"):
        from .data import contamination
        return getattr(contamination, name)
    if name in ("finetune", "merge"):
        from .adapt import finetune as ft
        return getattr(ft, name)
    if name == "validate_jsonl":
        from .adapt.chat_data import validate_jsonl
        return validate_jsonl
    if name == "evaluate":
        from .evals.runner import evaluate
        return evaluate
    if name == "get_model":
        from .providers import get_model
        return get_model
    if name == "train_tokenizer":
        from .tokenize.tokenizer import train_tokenizer
        return train_tokenizer
    if name == "pack":
        from .tokenize.pack import pack
        return pack
    if name == "pretrain":
        from .train.pretrain import pretrain
        return pretrain
    if name == "generate":
        from .generate import generate
        return generate
    if name == "load_model":
        from .models.io import load_model
        return load_model
    if name == "Workspace":
        from .workspace import Workspace
        return Workspace
    raise AttributeError(f"module 'fmkit' has no attribute {name!r}")
