"""Read documents from a corpus: the embedded stdlib corpus, a folder of text files, a text file or JSONL.

Every file that yields no document is counted with its reason in `CorpusStats`, so nothing is lost silently.
"""
from __future__ import annotations

import json
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import FmkitError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".toml", ".cfg", ".html", ".c", ".h")
# Held-out stdlib modules for validation: a fixed list present in every CPython 3.10+ install.
STDLIB_VAL_MODULES = ("json", "csv", "textwrap", "difflib", "statistics", "fractions", "calendar", "zipfile",
                      "shlex", "heapq")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                     "turtledemo", "ensurepip", "config-3"}


@dataclass
class Document:
    id: str
    text: str


@dataclass
class CorpusStats:
    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_module(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


PYDOC_TOPICS = "pydoc_data/topics"   # stands for the pydoc topic texts in a list of stdlib files


def stdlib_files(split: str) -> list:
    """The stdlib's .py files of a split (train: all but the held-out modules; val: those; all), in a fixed order;
    train and all end with PYDOC_TOPICS, the text of `help('TOPIC')` (`pydoc_data`)."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py")
                   if not (_STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
                   and not p.relative_to(root).parts[0].startswith(("config-", "site-packages")))
    out = [p for p in files if split == "all" or (split == "val") == (_stdlib_module(p.relative_to(root))
                                                                        in STDLIB_VAL_MODULES)]
    return out + ([PYDOC_TOPICS] if split in ("train", "all") else [])


def stdlib_doc_id(path) -> str:
    return f"stdlib/{Path(path).relative_to(stdlib_root())}"


def pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics  # ships with CPython

    for name in sorted(topics):
        yield f"stdlib/pydoc_data/{name}", topics[name]


def _stdlib_documents(split: str, stats: CorpusStats) -> Iterator[Document]:
    """The local Python standard library: its .py sources plus the pydoc topic texts (`pydoc_data`)."""
    for path in stdlib_files(split):
        if path == PYDOC_TOPICS:
            for doc_id, text in pydoc_topics():
                if text.strip():
                    stats.documents += 1
                    stats.bytes += len(text.encode())
                    yield Document(doc_id, text)
            continue
        doc = _read_text_file(path, stats, doc_id=stdlib_doc_id(path))
        if doc:
            yield doc


def read_text(path) -> tuple[str | None, str, bytes]:
    """(text, "", raw bytes) for a readable UTF-8 text file; otherwise (None, why, what could be read), why being
    unreadable (...), empty, binary or invalid utf-8 (with the offending byte's offset)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        return None, f"unreadable ({e.strerror})", b""
    if not raw.strip():
        return None, "empty", raw
    if b"\x00" in raw[:8192]:
        return None, "binary", raw
    try:
        return raw.decode("utf-8"), "", raw
    except UnicodeDecodeError as e:
        return None, f"invalid utf-8 at byte {e.start}", raw


def _read_text_file(path: Path, stats: CorpusStats, doc_id: str | None = None) -> Document | None:
    text, why, raw = read_text(path)
    if text is not None and not text.strip():
        text, why = None, "empty"
    if text is None:
        stats.skipped[why.split(" at byte")[0]] += 1
        return None
    stats.documents += 1
    stats.bytes += len(raw)
    return Document(doc_id or str(path), text)


def _jsonl_documents(path: Path, field_name: str, stats: CorpusStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                stats.skipped["broken jsonl line"] += 1
                continue
            text = row.get(field_name) if isinstance(row, dict) else None
            if not isinstance(text, str):
                stats.skipped[f"missing text field '{field_name}'"] += 1
                continue
            if not text.strip():
                stats.skipped["empty"] += 1
                continue
            stats.documents += 1
            stats.bytes += len(text.encode())
            yield Document(f"{path}:{lineno}", text)


def iter_documents(source: str | Path, stats: CorpusStats | None = None, text_field: str = "text",
                   suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> Iterator[Document]:
    """Yield the documents of `source`: `stdlib`, `stdlib:train`, `stdlib:val`, a curated dataset folder, a folder,
    a text file or JSONL."""
    stats = stats if stats is not None else CorpusStats()
    src = str(source)
    if src.startswith("stdlib"):
        split = src.partition(":")[2] or "all"
        if split not in ("all", "train", "val"):
            raise FmkitError(f"unknown stdlib split '{split}' in '{src}'; use stdlib, stdlib:train or stdlib:val")
        yield from _stdlib_documents(split, stats)
        return
    path = Path(src)
    if not path.exists():
        raise FmkitError(f"corpus path does not exist: {path}")
    if path.is_dir() and (path / "manifest.json").is_file():  # a curated dataset (fmkit curate)
        from .curate import read_dataset

        for row in read_dataset(path):
            stats.documents += 1
            stats.bytes += len(row["text"].encode())
            yield Document(row["id"], row["text"])
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FmkitError(f"corpus folder {path} is empty")
        for p in files:
            if p.suffix == ".jsonl":
                yield from _jsonl_documents(p, text_field, stats)
            elif p.suffix in suffixes:
                doc = _read_text_file(p, stats, doc_id=str(p.relative_to(path)))
                if doc:
                    yield doc
            else:
                stats.skipped[f"not a text file ({p.suffix or 'no suffix'})"] += 1
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field, stats)
    else:
        doc = _read_text_file(path, stats)
        if doc:
            yield doc


def dataset_id(source) -> str:
    """The registry id of a curated dataset folder ('' for any other corpus): lineage for what is built on it."""
    p = Path(str(source))
    if not (p / "manifest.json").is_file():
        return ""
    from ..workspace import read_manifest

    return read_manifest(p).get("id", "")


def require_documents(source: str | Path, stats: CorpusStats) -> None:
    """Fail with one sentence when a corpus produced no usable text at all."""
    if stats.documents == 0:
        why = ", ".join(f"{n} {r}" for r, n in stats.skipped.most_common()) or "no files"
        raise FmkitError(f"corpus {source} has no decodable text ({why})")
