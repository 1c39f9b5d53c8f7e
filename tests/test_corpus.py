import pytest

from fmkit.data.corpus import CorpusStats, iter_documents, require_documents
from fmkit.data.dataset import dataset_id, is_dataset, read_dataset
from fmkit.data.sources import SourceSpec, plan_units
from fmkit.data.stdlib import STDLIB_VAL_MODULES
from fmkit.errors import FmkitError


def test_stdlib_splits_are_disjoint_and_hold_out_fixed_modules():
    train = {d.id for d in iter_documents("stdlib:train")}
    val = {d.id for d in iter_documents("stdlib:val")}
    assert train and val and not train & val
    assert all(d.split("/")[1].removesuffix(".py") in STDLIB_VAL_MODULES for d in val)
    assert any(d.startswith("stdlib/pydoc_data/") for d in train)


def test_bad_files_are_counted_with_reasons(tmp_path):
    (tmp_path / "good.txt").write_text("hello world")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    (tmp_path / "rows.jsonl").write_text('{"text": "a row"}\n{broken\n{"other": 1}\n\n')
    stats = CorpusStats()
    docs = list(iter_documents(tmp_path, stats))
    assert sorted(d.text for d in docs) == ["a row", "hello world"]
    assert stats.skipped == {"empty": 1, "binary": 1, "invalid utf-8": 1, "not a text file (.png)": 1,
                             "broken JSONL line": 1, "missing text field 'text'": 1}


def test_missing_empty_and_undecodable_corpora_fail_in_one_sentence(tmp_path):
    with pytest.raises(FmkitError, match="corpus path does not exist"):
        list(iter_documents(tmp_path / "nope"))
    with pytest.raises(FmkitError, match="is empty"):
        list(iter_documents(tmp_path))
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa")
    stats = CorpusStats()
    list(iter_documents(tmp_path, stats))
    with pytest.raises(FmkitError, match=r"has no decodable text \(1 invalid utf-8\)"):
        require_documents(tmp_path, stats)


def test_unknown_stdlib_split_fails_the_same_for_corpus_and_curation():
    with pytest.raises(FmkitError, match="unknown stdlib split 'tset'"):
        list(iter_documents("stdlib:tset"))
    with pytest.raises(FmkitError, match="unknown stdlib split 'tset'"):
        plan_units(0, SourceSpec(name="s", path="stdlib:tset"))


def test_a_plain_folder_is_not_a_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert not is_dataset(tmp_path) and dataset_id(tmp_path) == ""
    with pytest.raises(FmkitError, match="is not a curated dataset"):
        list(read_dataset(tmp_path))
