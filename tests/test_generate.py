import pytest
import torch

from fmkit.errors import FmkitError
from fmkit.generate import Generator, sample_next
from fmkit.models.build import build_model, model_config
from fmkit.models.io import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("gen")
    cfg = model_config("decoder", "tiny", 512, 128, {"pad": 1, "eos": 0}, {"num_key_value_heads": 2})
    save_model(build_model(cfg, seed=1), out, tokenizer_dir, {"kind": "model"})
    return out


def test_greedy_matches_transformers_generate_with_padding(model_dir):
    gen = Generator(model_dir)
    prompts = ["def ", "import os\nclass Foo:", "x"]
    ours = gen(prompts, max_new_tokens=20, temperature=0)
    for prompt, c in zip(prompts, ours):
        ids = gen.tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = gen.model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
        assert c.tokens == ref.tolist()[:len(c.tokens)]


def test_top_k_one_is_greedy_and_sampling_is_seeded(model_dir):
    gen = Generator(model_dir)
    greedy = gen(["def "], max_new_tokens=12, temperature=0)[0].tokens
    assert gen(["def "], max_new_tokens=12, temperature=1.0, top_k=1)[0].tokens == greedy
    a = gen(["def "] * 2, max_new_tokens=12, temperature=1.5, seed=7)
    b = gen(["def "] * 2, max_new_tokens=12, temperature=1.5, seed=7)
    assert [c.tokens for c in a] == [c.tokens for c in b]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0, 0.75, gen)) for _ in range(300)}
    assert draws == {0, 1}


def test_stop_strings_cut_the_text(model_dir):
    gen = Generator(model_dir)
    full = gen(["def "], max_new_tokens=30, temperature=0)[0].text
    assert len(full) > 4
    stop = full[2:4]
    c = gen(["def "], max_new_tokens=30, temperature=0, stop=[stop])[0]
    assert c.finish_reason == "stop" and stop not in c.text and full.startswith(c.text)


def test_too_long_request_is_refused(model_dir):
    with pytest.raises(FmkitError, match="exceeds the model's 128 positions"):
        Generator(model_dir)(["def "], max_new_tokens=200)


def test_encoder_decoder_generates_through_transformers(tmp_path, tokenizer_dir):
    cfg = model_config("encoder-decoder", "tiny", 512, 64, {"pad": 1, "eos": 0})
    save_model(build_model(cfg), tmp_path, tokenizer_dir, {"kind": "model"})
    out = Generator(tmp_path)(["hello"], max_new_tokens=5, temperature=0)
    assert len(out) == 1 and out[0].finish_reason in ("stop", "length")


def test_packed_and_plain_weight_layouts_give_the_same_tokens(model_dir, monkeypatch):
    from fmkit.models import decode

    gen = Generator(model_dir)
    if torch.backends.mkldnn.is_available():  # the fast path is the one these tests exercise where it exists
        assert gen.fast.head.packed is not None
    packed = gen(["def ", "import os\nclass Foo:"], max_new_tokens=20, temperature=0)
    monkeypatch.setattr(decode, "onednn_pack", lambda w: None)
    plain = Generator(model_dir)
    assert plain.fast.head.packed is None
    assert [c.tokens for c in plain(["def ", "import os\nclass Foo:"], max_new_tokens=20, temperature=0)] == \
        [c.tokens for c in packed]


def test_bf16_decoding_tracks_fp32_logits(model_dir):
    gen32, gen16 = Generator(model_dir), Generator(model_dir, dtype="bf16")
    ids = gen32.tok("import os\nclass Foo:", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        ref = gen32.model(ids).logits[0, -1]
    pos = torch.arange(ids.shape[1])[None]
    got = gen16.fast.forward(ids, pos, gen16.fast.new_cache(1, ids.shape[1]), 0, None)[0]
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
