"""fmkit: the foundation-model lifecycle in one toolkit.

Every command-line verb is a function here with the same arguments (the table in verbs.py): `fmkit.pretrain(...)`,
`fmkit.finetune(...)`, `fmkit.evaluate(...)`, `fmkit.chat(...)`, ... Names are imported on first use, so
`import fmkit` stays fast and does not import torch.
"""
import logging
import warnings

from .errors import FmkitError
from .verbs import VERBS, by_python_name

__version__ = "0.1.0"

# bitsandbytes (imported by peft whenever it is installed) logs a hint to fetch CPU kernels from the hub; fmkit
# never downloads, and the built-in CPU path it falls back to is the one used
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft (0.21) still asks transformers for `is_gradient_checkpointing`, which v5 deprecates: noise for users of
# fmkit's verbs, nothing they can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)

# The rest of the Python API: building blocks the verbs are made of.
API = {
    "Workspace": "fmkit.workspace:Workspace",
    "resolve": "fmkit.models.reference:resolve",
    "load_model": "fmkit.models.io:load_model",
    "Generator": "fmkit.models.generate:Generator",
    "Chat": "fmkit.conversation:Chat",
    "Server": "fmkit.server.launch:Background",
    "get_model": "fmkit.providers:get_model",
    "validate_jsonl": "fmkit.adapt.chat_data:validate_jsonl",
    "NGramIndex": "fmkit.evals.ngrams:NGramIndex",
}

__all__ = ["FmkitError", *(v.python_name for v in VERBS), *API]


def __getattr__(name: str):
    import importlib

    verb = by_python_name(name)
    if verb is not None:
        return verb.function
    if name in API:
        module, attr = API[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fmkit' has no attribute {name!r}")
