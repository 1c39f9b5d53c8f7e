"""Read documents from a corpus: the embedded stdlib corpus, a curated dataset, a folder of text files, a text,
JSONL or Parquet file. The tokenizer and pack read their input here.

Files are read by the curation sources' readers (sources.py); what they reject is counted with its reason in
`CorpusStats` instead of being kept, so nothing is lost silently.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import FmkitError
from .dataset import is_dataset, read_dataset
from .sources import TEXT_SUFFIXES, Doc, Rejected, SourceSpec, read_file, read_jsonl, read_parquet, read_stdlib
from .stdlib import stdlib_files, stdlib_split


@dataclass
class CorpusStats:
    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def _read_path(spec: SourceSpec, path: Path, doc_id: str) -> Iterator[Doc | Rejected]:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        yield from read_jsonl(spec, path)
    elif path.suffix == ".parquet":
        yield from read_parquet(spec, path)
    else:
        yield read_file(spec, path, doc_id)


def _read_folder(spec: SourceSpec, root: Path, suffixes, stats: CorpusStats) -> Iterator[Doc | Rejected]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FmkitError(f"corpus folder {root} is empty")
    for p in files:
        if p.suffix in suffixes or p.name.endswith((".jsonl", ".jsonl.gz", ".parquet")):
            yield from _read_path(spec, p, str(p.relative_to(root)))
        else:
            stats.skipped[f"not a text file ({p.suffix or 'no suffix'})"] += 1


def iter_documents(source: str | Path, stats: CorpusStats | None = None, text_field: str = "text",
                   suffixes=TEXT_SUFFIXES) -> Iterator[Doc]:
    """Yield the documents of `source`: `stdlib`, `stdlib:train`, `stdlib:val`, a curated dataset folder, a folder,
    a text file, JSONL or Parquet."""
    stats = stats if stats is not None else CorpusStats()
    src = str(source)
    # No size limits: a tokenizer or pack reads what it is given; quarantining huge lines is curation's call.
    spec = SourceSpec(name="corpus", path=src, text_field=text_field, max_line_chars=0, max_doc_chars=0)
    path = Path(src)
    if src.startswith("stdlib"):
        items = (item for p in stdlib_files(stdlib_split(src)) for item in read_stdlib(spec, p))
    elif not path.exists():
        raise FmkitError(f"corpus path does not exist: {path}")
    elif is_dataset(path):
        items = (Doc(row["id"], row["text"]) for row in read_dataset(path))
    elif path.is_dir():
        items = _read_folder(spec, path, suffixes, stats)
    else:
        items = _read_path(spec, path, str(path))
    for item in items:
        if isinstance(item, Rejected):
            stats.skipped[item.reason.split(" (")[0]] += 1   # the kind of reason, not each parser message
            continue
        stats.documents += 1
        stats.bytes += len(item.text.encode())
        yield item


def require_documents(source: str | Path, stats: CorpusStats) -> None:
    """Fail with one sentence when a corpus produced no usable text at all."""
    if stats.documents == 0:
        why = ", ".join(f"{n} {r}" for r, n in stats.skipped.most_common()) or "no files"
        raise FmkitError(f"corpus {source} has no decodable text ({why})")
