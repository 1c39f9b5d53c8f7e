import pytest
from transformers import AutoTokenizer

from fmkit.errors import FmkitError
from fmkit.tokenize.tokenizer import EOS, MASK, PAD, sentinel, train_tokenizer


def test_round_trip_and_autotokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for text in ["def f(x):\n    return x ** 2  # square\n", "héllo wörld — ünïcode ✓ 数字", "\t\n  spaces  "]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok) == 512
    assert tok.eos_token == EOS and tok.pad_token == PAD and tok.mask_token == MASK
    assert tok.convert_tokens_to_ids(sentinel(7)) != tok.unk_token_id
    assert tok.convert_tokens_to_ids(EOS) == 0  # special tokens come first, before learned merges


def test_vocab_too_small_for_special_tokens(tmp_path):
    with pytest.raises(FmkitError, match="vocab size 270 is too small.*need at least 291"):
        train_tokenizer("stdlib:val", tmp_path / "t", vocab_size=270, sentinels=32, workspace=tmp_path)


def test_corpus_without_text_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_bytes(b"\x00\x00")
    with pytest.raises(FmkitError, match="no decodable text"):
        train_tokenizer(str(tmp_path / "c"), tmp_path / "t", vocab_size=300, workspace=tmp_path)
