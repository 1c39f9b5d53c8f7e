"""The index folder: `rag.sqlite` (documents, chunks with metadata and float32 vectors, an FTS5 table for BM25)
and `vectors.npz`, the same vectors as one float16 matrix for dense search, tagged with the generation of the
SQLite state it was written from and rebuilt whenever the two disagree."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np

from ...errors import FmkitError

RESERVED = {"source", "title", "chunk", "path"}   # metadata keys that fmkit sets on every chunk

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


def open_index(index_dir: str | Path, create: bool = False) -> sqlite3.Connection:
    index_dir = Path(index_dir)
    path = index_dir / "rag.sqlite"
    if not path.exists():
        if not create:
            raise FmkitError(f"there is no RAG index at {index_dir}; run `fmkit rag index DOCS {index_dir}` first")
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


def get_setting(db: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def set_setting(db: sqlite3.Connection, key: str, value) -> None:
    db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, str(value)))


def commit(db: sqlite3.Connection) -> None:
    """Commit under a new generation, so that a vectors.npz written before now is known to be stale. Random, not
    a counter: an index deleted and built again must not reuse an old generation."""
    set_setting(db, "generation", os.urandom(8).hex())
    db.commit()


_MATRICES: dict[str, tuple] = {}   # folder -> (generation, ids, float16 torch matrix): loaded once per process


def vectors(db: sqlite3.Connection, index_dir: Path):
    """(chunk ids ascending, float16 torch matrix with one row per id) at the index's current generation."""
    import torch

    key, gen = str(Path(index_dir).resolve()), get_setting(db, "generation", "")
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
        dim = int(get_setting(db, "dim", "0"))
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        matrix = matrix.astype(np.float16)   # half the memory traffic per query; exact scores come from SQLite
        tmp = path.with_name("vectors.tmp.npz")
        np.savez(tmp, generation=gen, ids=ids, vectors=matrix)
        os.replace(tmp, path)   # readers see the old file or the new one, never half of one
    _MATRICES[key] = (gen, ids, torch.from_numpy(matrix))
    return _MATRICES[key][1:]


def meta_text(value) -> str:
    """A metadata or filter value as stored and compared: text, with booleans as JSON writes them."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def add_document(db: sqlite3.Connection, key: str, source: str, digest: str, title: str, chunks: list[str],
                  vectors: np.ndarray, metadata: dict) -> int:
    """Replace the chunks of the document at absolute path KEY; returns how many old chunks it had."""
    removed = db.execute("DELETE FROM chunks WHERE path = ?", (key,)).rowcount
    for n, (text, vector) in enumerate(zip(chunks, vectors)):
        meta = {"source": source, "title": title, "chunk": n, "path": key, **metadata}
        cid = db.execute("INSERT INTO chunks (path, source, title, chunk, text, meta, vector) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?)", (key, source, title, n, text, json.dumps(meta),
                                                   np.asarray(vector, dtype=np.float32).tobytes())).lastrowid
        db.executemany("INSERT INTO chunk_meta VALUES (?, ?, ?)", [(cid, k, meta_text(v)) for k, v in meta.items()])
    db.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", (key, source, digest))
    return removed


def check_metadata(metadata: dict | None) -> dict:
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
