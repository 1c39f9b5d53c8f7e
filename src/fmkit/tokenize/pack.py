"""Tokenize documents into flat uint16/uint32 shards plus `index.json` (the token-shards artifact)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..data.corpus import CorpusStats, iter_documents, require_documents
from ..data.dataset import dataset_id
from ..errors import FmkitError
from ..models.io import load_tokenizer
from ..progress import progress_bar
from ..workspace import Workspace, read_manifest, write_manifest
from .tokenizer import EOS

FORMAT = "fmkit.shards/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.shards: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._starts: list[int] = []
        self._n = 0

    def add(self, ids: np.ndarray) -> None:
        self._starts.append(self._n)
        self._buf.append(ids)
        self._n += len(ids)
        if self._n >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._n:
            return
        i = len(self.shards)
        name = f"shard-{i:05d}"
        np.concatenate(self._buf).astype(self.dtype).tofile(self.out / f"{name}.bin")
        np.asarray(self._starts, dtype=np.int64).tofile(self.out / f"{name}.docs.bin")
        self.shards.append({"file": f"{name}.bin", "tokens": self._n, "documents": len(self._starts),
                            "doc_starts": f"{name}.docs.bin"})
        self._buf, self._starts, self._n = [], [], 0


def pack(corpus: str, tokenizer: str | Path, out: str | Path | None = None, shard_tokens: int = 50_000_000,
         batch_docs: int = 64, workspace: str | Path | None = None, name: str = "") -> Path:
    """Tokenize a corpus into flat uint16/uint32 token shards with index.json (read with np.memmap).

    Each document is followed by EOS. Tokenization runs in parallel on all cores (the `tokenizers` Rust pool over
    each batch of documents). Document start offsets go to a binary sidecar per shard, named in index.json.

    Args:
        corpus: stdlib, stdlib:train, stdlib:val, a curated dataset folder, a folder, a text file or JSONL.
        tokenizer: Tokenizer folder (fmkit tokenizer train).
        out: Output folder (default <workspace>/shards/NAME).
        shard_tokens: Tokens per shard file.
        batch_docs: Documents tokenized per batch.
        workspace: Workspace folder: artifacts and the registry (default $FMKIT_WORKSPACE or ./fmkit-workspace).
        name: Artifact name (default: from the corpus).
    """
    tok = load_tokenizer(tokenizer)
    eos = tok.convert_tokens_to_ids(EOS)
    if eos is None or eos == tok.unk_token_id:
        raise FmkitError(f"tokenizer {tokenizer} has no {EOS} token to separate documents")
    vocab = len(tok)
    dtype = token_dtype(vocab)
    ws = Workspace(workspace)
    out = Path(out) if out else ws.path("shards", name or Path(str(corpus)).name.replace(":", "-"))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*"):
        old.unlink()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    backend = tok.backend_tokenizer
    stats = CorpusStats()
    writer = _ShardWriter(out, dtype, shard_tokens)
    started = time.time()
    tokens = 0
    with progress_bar("pack", unit="MB") as bar:
        task = bar.add_task("tokenizing", total=None)
        batch: list[str] = []

        def flush_batch():
            nonlocal tokens
            for enc in backend.encode_batch(batch, add_special_tokens=False):
                ids = np.fromiter(enc.ids, dtype=np.int64, count=len(enc.ids))
                writer.add(np.append(ids, eos))
                tokens += len(ids) + 1
            bar.update(task, completed=stats.bytes / 1e6)
            batch.clear()

        for doc in iter_documents(corpus, stats):
            batch.append(doc.text)
            if len(batch) >= batch_docs:
                flush_batch()
        if batch:
            flush_batch()
    require_documents(corpus, stats)
    writer.flush()
    tok_manifest = read_manifest(tokenizer)
    index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab, "eos_id": eos, "tokens": tokens,
             "documents": stats.documents, "bytes": stats.bytes, "shards": writer.shards,
             "source": str(Path(str(corpus)).resolve()) if Path(str(corpus)).exists() else str(corpus),
             "tokenizer": str(Path(tokenizer).resolve()),
             "tokenizer_id": tok_manifest.get("id", ""), "dataset_id": dataset_id(corpus),
             "skipped": dict(stats.skipped)}
    (out / "index.json").write_text(json.dumps(index, indent=2))
    tok.save_pretrained(out / "tokenizer")  # the shards carry their tokenizer, so models built on them can too
    manifest = {"kind": "shards", **{k: v for k, v in index.items() if k != "shards"},
                "seconds": round(time.time() - started, 1)}
    manifest["id"] = ws.add_artifact("shards", out, manifest, parents=[tok_manifest.get("id", ""),
                                                                           index["dataset_id"]])
    write_manifest(out, manifest)
    return out
