"""Byte-level BPE tokenizers trained with `tokenizers`, saved so `transformers.AutoTokenizer` loads them."""
from __future__ import annotations

import time
from pathlib import Path

from ..data.corpus import CorpusStats, iter_documents, require_documents
from ..data.dataset import dataset_id
from ..errors import FmkitError
from ..workspace import Workspace, write_manifest

EOS = "<|endoftext|>"   # separates documents in packed shards; doubles as BOS
PAD = "<|pad|>"
MASK = "<|mask|>"       # masked-LM objective


def sentinel(i: int) -> str:
    """The i-th span-corruption sentinel (T5's <extra_id_i>)."""
    return f"<|extra_{i}|>"


def special_tokens(sentinels: int) -> list[str]:
    return [EOS, PAD, MASK] + [sentinel(i) for i in range(sentinels)]


def train_tokenizer(corpus: str, out: str | Path | None = None, vocab_size: int = 8192, sentinels: int = 32,
                    min_frequency: int = 2, max_bytes: int = 0, workspace: str | Path | None = None,
                    name: str = "") -> Path:
    """Train a byte-level BPE tokenizer; the folder (tokenizer.json) loads with transformers.AutoTokenizer.

    max_bytes > 0 trains on the first max_bytes of text only (BPE merges settle long before a large corpus ends).

    Args:
        corpus: stdlib, stdlib:train, stdlib:val, a curated dataset folder, a folder, a text file or JSONL.
        out: Output folder (default <workspace>/tokenizers/NAME).
        vocab_size: Vocabulary size, special tokens included.
        sentinels: Span-corruption sentinel tokens to reserve (T5-style models).
        min_frequency: Merges must occur at least this often.
        max_bytes: Train on the first N bytes of text only (0: all).
        workspace: Workspace folder: artifacts and the registry (default $FMKIT_WORKSPACE or ./fmkit-workspace).
        name: Artifact name (default: from the corpus).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(sentinels)
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise FmkitError(f"vocab size {vocab_size} is too small: the 256 byte tokens and {len(specials)} special "
                         f"tokens need at least {minimum}; raise --vocab-size or lower --sentinels")
    ws = Workspace(workspace)
    name = name or f"{Path(str(corpus)).name.replace(':', '-')}-{vocab_size}"
    out = Path(out) if out else ws.path("tokenizers", name)
    stats = CorpusStats()

    def texts():
        seen = 0
        for doc in iter_documents(corpus, stats):
            yield doc.text
            seen += len(doc.text)
            if max_bytes and seen >= max_bytes:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    started = time.time()
    tok.train_from_iterator(texts(), trainer)
    require_documents(corpus, stats)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                 mask_token=MASK, additional_special_tokens=[sentinel(i) for i in range(sentinels)])
    hf.model_max_length = 1 << 30
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    manifest = {"kind": "tokenizer", "type": "byte-level BPE", "vocab_size": tok.get_vocab_size(),
                "requested_vocab_size": vocab_size, "special_tokens": specials, "sentinels": sentinels,
                "corpus": str(corpus), "documents": stats.documents, "bytes": stats.bytes,
                "skipped": dict(stats.skipped), "max_bytes": max_bytes, "seconds": round(time.time() - started, 1)}
    manifest["id"] = ws.add_artifact("tokenizer", out, manifest, parents=[dataset_id(corpus)])
    write_manifest(out, manifest)
    return out
