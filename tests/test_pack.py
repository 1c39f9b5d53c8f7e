import json

import numpy as np
import pytest

from fmkit.errors import FmkitError
from fmkit.models.io import load_tokenizer
from fmkit.tokenize.pack import pack, token_dtype
from fmkit.tokenize.shards import TokenShards


def test_dtype_is_the_smallest_that_fits():
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_documents_are_eos_separated_and_boundaries_recorded(shards_dir, tokenizer_dir):
    shards = TokenShards(shards_dir)
    tok = load_tokenizer(tokenizer_dir)
    index = json.loads((shards_dir / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 512
    assert index["tokens"] == shards.tokens and shards.arrays[0].dtype == np.uint16
    starts = shards.document_starts(0)
    assert len(starts) == index["documents"] and starts[0] == 0
    arr = shards.arrays[0]
    assert (arr[starts[1:] - 1] == tok.eos_token_id).all()  # every document ends with EOS
    first = tok.decode(arr[:starts[1] - 1].tolist())
    assert first.startswith('"""') or first.strip()  # the first held-out module's text, decoded back


def test_small_shards_split_and_sampling_is_deterministic(tmp_path, tokenizer_dir):
    out = pack("stdlib:val", tokenizer_dir, tmp_path / "s", shard_tokens=20_000, workspace=tmp_path)
    shards = TokenShards(out)
    assert len(shards.arrays) > 3
    a = shards.sample(np.random.default_rng(1), 8, 65)
    b = shards.sample(np.random.default_rng(1), 8, 65)
    assert a.shape == (8, 65) and (a == b).all()
    flat = np.concatenate([np.asarray(x) for x in shards.arrays])
    row = a[0]
    hits = np.flatnonzero(flat == row[0])
    assert any((flat[h:h + 65] == row).all() for h in hits)  # each window is a real slice of the stream


def test_truncated_shard_is_reported(tmp_path, tokenizer_dir):
    out = pack("stdlib:val", tokenizer_dir, tmp_path / "s", workspace=tmp_path)
    shard = out / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FmkitError, match="missing or truncated"):
        TokenShards(out)


def test_window_longer_than_data_is_refused(shards_dir):
    with pytest.raises(FmkitError, match="fewer than one window"):
        TokenShards(shards_dir).sample(np.random.default_rng(0), 1, 10**9)
