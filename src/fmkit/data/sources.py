"""Curation sources: where raw documents come from, cut into units of work, each read into documents.

A source is a folder tree matched by globs, JSONL or Parquet files with a named text field, the embedded stdlib
corpus, or a Hugging Face dataset id. Its files are grouped into *units* (the grain of parallelism and of resume).
Reading never raises for bad data: a binary file, invalid UTF-8, an empty file, a broken JSONL line, a missing
text field or a huge single line becomes a `Rejected` record with its reason and location. The readers of single
files, JSONL, Parquet and stdlib entries are also what `corpus.iter_documents` reads plain corpora with.
"""
from __future__ import annotations

import glob as globlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import FmkitError
from .stdlib import PYDOC_TOPICS, pydoc_topics, stdlib_doc_id, stdlib_files, stdlib_split

# Code files get the code filters (kind "code"); every other text suffix is prose or configuration.
CODE_SUFFIXES = frozenset({".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs",
                           ".rb", ".sh", ".pl", ".lua", ".scala", ".kt", ".swift", ".cs", ".php", ".sql", ".r", ".m"})
TEXT_SUFFIXES = CODE_SUFFIXES | {".txt", ".md", ".rst", ".markdown", ".html", ".htm", ".tex", ".org", ".adoc",
                                 ".json", ".yaml", ".yml", ".toml", ".cfg"}
SOURCE_TYPES = ("dir", "jsonl", "parquet", "stdlib", "hf")


@dataclass
class Doc:
    id: str
    text: str
    source: str = ""
    domain: str = ""
    kind: str = "text"          # text | code: which filter blocks apply
    location: str = ""          # file, or file:line for JSONL
    counts: Counter = field(default_factory=Counter)  # per-document tallies (PII redactions, C4 lines removed)


@dataclass
class Rejected:
    id: str
    reason: str
    location: str
    text: str = ""              # what could be decoded, kept for inspection (capped)


@dataclass
class SourceSpec:
    name: str
    type: str = ""              # dir | jsonl | parquet | stdlib | hf; inferred from `path` when empty
    path: str = ""              # folder, file, or glob; `stdlib`, `stdlib:train` or `stdlib:val` for the stdlib
    glob: list = field(default_factory=lambda: ["**/*"])   # for dir sources, relative to `path`
    text_field: str = "text"
    id_field: str = ""          # JSONL/Parquet: a column holding document ids (default: file:line)
    domain: str = ""            # tag used for mixing; defaults to the source name
    kind: str = "auto"          # text | code | auto (by file suffix: code for .py, .c, ...; text otherwise)
    dataset: str = ""           # hf: dataset id
    split: str = "train"        # hf: split
    limit: int = 0              # hf: read at most this many rows (0: all)
    max_line_chars: int = 100_000   # a longer line quarantines the document (minified, data blobs); 0: no limit
    max_doc_chars: int = 5_000_000  # 0: no limit


@dataclass
class Unit:
    """One unit of work: some files of one source. `uid` names its outputs and its done marker."""
    uid: str
    source: int                 # index into the recipe's sources
    files: list


def infer_type(spec: SourceSpec) -> str:
    if spec.type:
        if spec.type not in SOURCE_TYPES:
            raise FmkitError(f"source '{spec.name}': unknown type '{spec.type}'; use one of {', '.join(SOURCE_TYPES)}")
        return spec.type
    if spec.dataset:
        return "hf"
    p = spec.path
    if p.startswith("stdlib"):
        return "stdlib"
    if p.endswith(".jsonl") or p.endswith(".jsonl.gz"):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "dir"


def plan_units(index: int, spec: SourceSpec, files_per_unit: int = 64) -> list[Unit]:
    """Cut a source into units. A source that names nothing readable fails with one sentence."""
    kind = infer_type(spec)
    if kind == "hf":
        return [Unit(f"{index:03d}-00000", index, [spec.dataset])]
    if kind == "stdlib":
        files = [str(p) for p in stdlib_files(stdlib_split(spec.path))]
    elif kind == "dir":
        root = Path(spec.path)
        if not root.is_dir():
            raise FmkitError(f"source '{spec.name}': folder {root} does not exist")
        globs = [spec.glob] if isinstance(spec.glob, str) else list(spec.glob)
        files = sorted({str(p) for g in globs for p in root.glob(g) if p.is_file() and not p.name.startswith(".")})
        if not files:
            raise FmkitError(f"source '{spec.name}': no files under {root} match {', '.join(globs)}")
    else:
        files = sorted(globlib.glob(spec.path, recursive=True)) if any(c in spec.path for c in "*?[") \
            else [spec.path]
        missing = [f for f in files if not Path(f).is_file()]
        if not files or missing:
            raise FmkitError(f"source '{spec.name}': file {missing[0] if missing else spec.path} does not exist")
        files_per_unit = 1   # one JSONL/Parquet file is already a unit's worth
    return [Unit(f"{index:03d}-{i // files_per_unit:05d}", index, files[i:i + files_per_unit])
            for i in range(0, len(files), files_per_unit)]


def _kind_for(spec: SourceSpec, path: str) -> str:
    if spec.kind != "auto":
        return spec.kind
    return "code" if Path(path).suffix.lower() in CODE_SUFFIXES else "text"


def _check_text(text: str, spec: SourceSpec) -> str | None:
    if not text.strip():
        return "empty"
    if spec.max_doc_chars and len(text) > spec.max_doc_chars:
        return "document too large"
    if spec.max_line_chars and len(text) > spec.max_line_chars \
            and max(map(len, text.splitlines())) > spec.max_line_chars:
        return "huge single line"
    return None


PREVIEW = 20_000   # characters of a rejected document kept in rejected/ (enough to judge why it went)


def _read_text(path) -> tuple[str | None, str, bytes]:
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


def read_file(spec: SourceSpec, path, doc_id: str) -> Doc | Rejected:
    """One text file as one document."""
    path = str(path)
    text, why, raw = _read_text(path)
    if why == "binary":
        return Rejected(doc_id, why, path, raw[:200].decode("latin-1"))
    if why.startswith("invalid utf-8"):
        return Rejected(doc_id, "invalid utf-8", path,
                        why.removeprefix("invalid utf-8 at ") + ": " + raw[:PREVIEW].decode("utf-8", "replace"))
    if text is None:
        return Rejected(doc_id, why, path)
    bad = _check_text(text, spec)
    if bad:
        return Rejected(doc_id, bad, path, text[:PREVIEW])
    return Doc(doc_id, text, spec.name, spec.domain or spec.name, _kind_for(spec, path), path)


def _row(spec: SourceSpec, row, location: str, default_id: str) -> Doc | Rejected:
    if not isinstance(row, dict):
        return Rejected(default_id, "not a JSON object", location, str(row)[:PREVIEW])
    doc_id = str(row.get(spec.id_field, default_id)) if spec.id_field else default_id
    text = row.get(spec.text_field)
    if text is None:
        return Rejected(doc_id, f"missing text field '{spec.text_field}'", location, json.dumps(row)[:PREVIEW])
    if not isinstance(text, str):
        return Rejected(doc_id, f"text field '{spec.text_field}' is {type(text).__name__}, not a string", location,
                        json.dumps(row, default=str)[:PREVIEW])
    bad = _check_text(text, spec)
    if bad:
        return Rejected(doc_id, bad, location, text[:PREVIEW])
    return Doc(doc_id, text, spec.name, spec.domain or spec.name, spec.kind if spec.kind != "auto" else "text",
               location)


def read_jsonl(spec: SourceSpec, path) -> Iterator[Doc | Rejected]:
    """One document per line of a JSONL file (gzipped when it ends in .gz)."""
    import gzip

    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            loc = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except UnicodeDecodeError:
                yield Rejected(loc, "invalid utf-8", loc, line[:PREVIEW].decode("utf-8", "replace"))
                continue
            except json.JSONDecodeError as e:
                yield Rejected(loc, f"broken JSONL line ({e.msg})", loc, line[:PREVIEW].decode("utf-8", "replace"))
                continue
            yield _row(spec, row, loc, loc)


def read_parquet(spec: SourceSpec, path) -> Iterator[Doc | Rejected]:
    """One document per row of a Parquet file."""
    import pyarrow.parquet as pq

    path = str(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield Rejected(path, f"unreadable parquet ({type(e).__name__})", path)
        return
    names = set(pf.schema_arrow.names)
    if spec.text_field not in names:
        yield Rejected(path, f"missing text field '{spec.text_field}' (columns: {', '.join(sorted(names))})", path)
        return
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            loc = f"{path}:{row_no}"
            yield _row(spec, row, loc, loc)


def _read_hf(spec: SourceSpec) -> Iterator[Doc | Rejected]:
    try:
        import datasets
    except ImportError:
        raise FmkitError(f"source '{spec.name}' names a Hugging Face dataset: pip install datasets") from None
    try:
        ds = datasets.load_dataset(spec.dataset, split=spec.split, streaming=True)
    except Exception as e:
        raise FmkitError(f"source '{spec.name}': cannot load dataset '{spec.dataset}' ({str(e).splitlines()[0]})") \
            from None
    for i, row in enumerate(ds):
        if spec.limit and i >= spec.limit:
            break
        loc = f"{spec.dataset}[{spec.split}]:{i}"
        yield _row(spec, row, loc, loc)


def read_stdlib(spec: SourceSpec, path) -> Iterator[Doc | Rejected]:
    """One entry of `stdlib_files`: a .py file, or PYDOC_TOPICS (every pydoc topic text)."""
    if path != PYDOC_TOPICS:
        yield read_file(spec, path, stdlib_doc_id(path))
        return
    for doc_id, text in pydoc_topics():
        bad = _check_text(text, spec)
        yield Rejected(doc_id, bad, PYDOC_TOPICS, text[:PREVIEW]) if bad else \
            Doc(doc_id, text, spec.name, spec.domain or spec.name, spec.kind if spec.kind != "auto" else "text",
                PYDOC_TOPICS)


def read_unit(spec: SourceSpec, unit: Unit) -> Iterator[Doc | Rejected]:
    kind = infer_type(spec)
    if kind == "hf":
        yield from _read_hf(spec)
        return
    for path in unit.files:
        if kind == "jsonl":
            yield from read_jsonl(spec, path)
        elif kind == "parquet":
            yield from read_parquet(spec, path)
        elif kind == "stdlib":
            yield from read_stdlib(spec, path)
        else:
            yield read_file(spec, path, str(Path(path).relative_to(spec.path)))
