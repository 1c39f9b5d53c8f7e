import pytest
import torch

from fmkit.errors import FmkitError
from fmkit.models.generate import Generator, argmax_ids, argmax_rows, sample_next
from fmkit.models import decode, native
from fmkit.models.build import build_model, model_config
from fmkit.models.decode import LlamaDecoder
from fmkit.models.io import save_model

needs_compiler = pytest.mark.skipif(native.load() is None, reason=f"compiled step unavailable: {native.why_not()}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("gen")
    cfg = model_config("decoder", "tiny", 512, 128, {"pad": 1, "eos": 0}, {"num_key_value_heads": 2})
    save_model(build_model(cfg, seed=1), out, tokenizer_dir, {"kind": "model"})
    return out


def test_greedy_matches_transformers_generate_with_padding(model_dir):
    gen = Generator(model_dir, dtype="fp32")
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


@pytest.mark.parametrize("vocab", [5, 128, 200, 4096, 50257])
def test_argmax_rows_gives_torch_argmax(vocab):
    """Ties go to the first maximum, NaN counts as the maximum, and the values past the last whole block count."""
    g = torch.Generator().manual_seed(vocab)
    cases = [torch.randn(16, vocab, generator=g), torch.randint(0, 3, (16, vocab), generator=g).float(),
             torch.full((3, vocab), float("-inf")), torch.randn(1, vocab, generator=g)]
    nan = torch.randn(4, vocab, generator=g)
    nan[0, vocab // 2] = nan[1, -1] = nan[2, 0] = nan[2, -1] = float("nan")
    tail = torch.randn(4, vocab, generator=g)
    tail[:, -1] = 50.0
    tail[1, 0] = 50.0   # a tie between the first block and the tail: the first wins
    for x in cases + [nan, tail]:
        assert torch.equal(argmax_rows(x), x.argmax(-1))
        for y in (x, x.bfloat16()):   # the compiled search (where it builds): same rule, bf16 as it is stored
            assert argmax_ids(y) == y.float().argmax(-1).tolist()
            assert argmax_ids(y, 2) == y.float().argmax(-1).tolist()[:2]


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

    gen = Generator(model_dir, dtype="fp32")
    if torch.backends.mkldnn.is_available():  # the fast path is the one these tests exercise where it exists
        assert gen.fast.head.packed is not None
    packed = gen(["def ", "import os\nclass Foo:"], max_new_tokens=20, temperature=0)
    monkeypatch.setattr(decode, "onednn_pack", lambda w: None)
    plain = Generator(model_dir, dtype="fp32")
    assert plain.fast.head.packed is None
    assert [c.tokens for c in plain(["def ", "import os\nclass Foo:"], max_new_tokens=20, temperature=0)] == \
        [c.tokens for c in packed]


def test_bf16_decoding_tracks_fp32_logits(model_dir):
    gen32, gen16 = Generator(model_dir, dtype="fp32"), Generator(model_dir, dtype="bf16")
    ids = gen32.tok("import os\nclass Foo:", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        ref = gen32.model(ids).logits[0, -1]
    pos = torch.arange(ids.shape[1])[None]
    got = gen16.fast.forward(ids, pos, gen16.fast.new_cache(1, ids.shape[1]), 0, None)[0]
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()


def _steps(dec, ids, real, n):
    """Prefill, then n greedy single-token steps: (logits per step, tokens per step)."""
    b, width = ids.shape
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    key_mask = None if real.all() else torch.cat([real, torch.ones(b, n, dtype=torch.bool)], 1)
    cache = dec.new_cache(b, width + n)
    logits, pos, out = dec.forward(ids, positions, cache, 0, key_mask), positions[:, -1], []
    for i in range(n):
        nxt = logits.argmax(-1)
        pos = pos + 1
        logits = dec.forward(nxt[:, None], pos[:, None], cache, width + i, key_mask)
        out.append((logits, nxt))
    return out


@needs_compiler
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_compiled_step_matches_the_pytorch_step(model_dir, batch, monkeypatch):
    """Batch 1 also runs the output layer in C (fp32); batch 3 has a left-padded row and GQA (2 kv heads); batch 40
    is past the 16 rows the compiled step used to stop at."""
    model = Generator(model_dir, dtype="fp32").model
    ours, ref = LlamaDecoder(model, use_native=True), LlamaDecoder(model, use_native=False)
    assert ours.native is not None and ref.native is None and batch <= decode.NATIVE_MAX_BATCH
    calls = []
    monkeypatch.setattr(ours, "_native_step", lambda *a, step=ours._native_step: calls.append(1) or step(*a))
    ids = torch.randint(2, 512, (batch, 9), generator=torch.Generator().manual_seed(batch))
    real = torch.ones(batch, 9, dtype=torch.bool)
    real[-1, :4] = batch > 1
    for (a, ta), (b, tb) in zip(_steps(ours, ids, real, 12), _steps(ref, ids, real, 12)):
        assert torch.equal(ta, tb)
        assert (a - b).abs().max() < 1e-4
    assert calls   # the decoding steps ran in C


@needs_compiler
@pytest.mark.parametrize("shape, threads", [
    ({"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 12,
      "intermediate_size": 100}, None),   # heads not a multiple of the vector width, outputs past the last panel
    ({"num_key_value_heads": 2}, 3),       # 8 heads over 3 threads: the projections split by panels, not heads
])
def test_compiled_step_matches_the_pytorch_step_at_any_shape(shape, threads):
    """The compiled step takes whole heads per thread only where they split evenly and are whole vectors; the other
    shapes go the general way, with the same results."""
    model = build_model(model_config("decoder", "tiny", 512, 128, {"pad": 1, "eos": 0}, shape), seed=2).float().eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        ours, ref = LlamaDecoder(model, use_native=True), LlamaDecoder(model, use_native=False)
        assert ours.native is not None
        ids = torch.randint(2, 512, (5, 7), generator=torch.Generator().manual_seed(0))
        real = torch.ones(5, 7, dtype=torch.bool)
        for (a, ta), (b, tb) in zip(_steps(ours, ids, real, 6), _steps(ref, ids, real, 6)):
            assert torch.equal(ta, tb)
            assert (a - b).abs().max() < 1e-4
    finally:
        torch.set_num_threads(before)


@needs_compiler
def test_compiled_bf16_step_tracks_fp32_logits(model_dir):
    gen = Generator(model_dir, dtype="fp32")
    ids = gen.tok("import os\nclass Foo:", return_tensors="pt", add_special_tokens=False)["input_ids"]
    dec = LlamaDecoder(gen.model, torch.bfloat16, use_native=True)
    (got, fed), = _steps(dec, ids, torch.ones_like(ids, dtype=torch.bool), 1)
    full = torch.cat([ids, fed[:, None]], 1)
    with torch.inference_mode():
        ref = gen.model(full).logits[0, -1]
    assert (got[0] - ref).abs().max() < 0.02 * ref.abs().max()


@needs_compiler
def test_compiled_bf16_step_writes_the_output_layer_input_as_torch_rounds_it(model_dir):
    """The step's own bf16 copy of its final hidden state is exactly out.to(bfloat16), so the output layer sees
    what it saw when PyTorch converted it, and raw logits are the same values as the widened ones."""
    gen = Generator(model_dir, dtype="fp32")
    dec = LlamaDecoder(gen.model, torch.bfloat16, use_native=True)
    cache = dec.new_cache(3, 16)
    wide = dec.step_rows([5, 6, 7], [0, 1, 2], [0, 0, 0], cache)
    bound = cache.bound
    assert bound.head_in.dtype == torch.bfloat16
    assert torch.equal(bound.head_in[:3], bound.out[:3].to(torch.bfloat16))
    raw = dec.step_rows([5, 6, 7], [0, 1, 2], [0, 0, 0], cache, raw=True)
    assert raw.dtype == torch.bfloat16 and torch.equal(raw.float(), wide)


@needs_compiler
def test_compiled_step_refuses_what_pytorch_would_refuse(model_dir):
    """The C step trusts its pointers, so ids, positions, slots and shapes are checked before it runs."""
    dec = LlamaDecoder(Generator(model_dir, dtype="fp32").model, use_native=True)
    cache = dec.new_cache(2, 8)
    two = torch.tensor([[5], [6]])
    with pytest.raises(IndexError, match="out of range"):
        dec.forward(torch.tensor([[512], [5]]), two, cache, 0, None)
    with pytest.raises(IndexError, match="out of range"):
        dec.forward(two, two, cache, 8, None)
    with pytest.raises(ValueError, match="do not fit a cache of 2 rows"):
        dec.forward(torch.tensor([[5]]), torch.tensor([[0]]), cache, 0, None)
    with pytest.raises(ValueError, match="do not fit"):
        dec.forward(two, two, cache, 3, torch.ones(2, 3, dtype=torch.bool))  # mask too short for slot 3
    # int32 ids are widened, not misread
    want = dec.forward(two, two, dec.new_cache(2, 8), 0, None)
    assert torch.equal(dec.forward(two.int(), two.int(), dec.new_cache(2, 8), 0, None), want)


@needs_compiler
def test_compiled_step_handles_a_fully_masked_row_like_sdpa(model_dir):
    model = Generator(model_dir, dtype="fp32").model
    ours, ref = LlamaDecoder(model, use_native=True), LlamaDecoder(model, use_native=False)
    ids, pos = torch.tensor([[5], [6]]), torch.tensor([[0], [0]])
    mask = torch.tensor([[True], [False]])
    a = ours.forward(ids, pos, ours.new_cache(2, 1), 0, mask)
    b = ref.forward(ids, pos, ref.new_cache(2, 1), 0, mask)
    assert not a.isnan().any() and (a - b).abs().max() < 1e-4


def test_compiled_step_is_used_only_for_what_it_supports(model_dir):
    model = Generator(model_dir, dtype="fp32").model
    assert LlamaDecoder(model, torch.float16).native is None
    with pytest.raises(RuntimeError, match="not supported"):
        LlamaDecoder(model, torch.float16, use_native=True)


def test_without_a_compiler_decoding_falls_back_to_pytorch(model_dir, monkeypatch, tmp_path):
    want = Generator(model_dir, dtype="fp32")(["def "], max_new_tokens=10, temperature=0)[0].tokens
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("FMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    gen = Generator(model_dir, dtype="fp32")
    assert gen.fast.native is None and "no-such-cc" in native.why_not()
    assert gen(["def "], max_new_tokens=10, temperature=0)[0].tokens == want
    with pytest.raises(RuntimeError, match="unavailable"):
        LlamaDecoder(gen.model, use_native=True)


def test_a_failed_compile_is_tried_once(monkeypatch, tmp_path):
    monkeypatch.setenv("FMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(OSError, match="failed"):
        native.build()
    (marker,) = (tmp_path / "kernels").glob("*.failed")
    assert "with false failed" in marker.read_text()
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    with pytest.raises(OSError, match="delete .* to try again"):
        native.build()


@needs_compiler
def test_kernel_is_built_once_per_machine_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("FMKIT_CACHE_DIR", str(tmp_path))
    first = native.build()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary or failure marker left


def test_auto_dtype_follows_the_cpu(model_dir, tmp_path, monkeypatch):
    from fmkit import runtime

    assert Generator(model_dir).dtype == ("bf16" if runtime.decode_in_bf16() else "fp32")
    with pytest.raises(FmkitError, match="dtype must be auto"):
        Generator(model_dir, dtype="fp16")
    # bf16 instructions in the flags decide, whatever a square matmul says; without flags, the matmul probe
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\n"
    for flags, want in (("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512bw", False)):
        (tmp_path / "cpuinfo").write_text(x86.format(flags))
        assert runtime.cpu_has_bf16.__wrapped__(str(tmp_path / "cpuinfo")) is want
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert runtime.cpu_has_bf16.__wrapped__(str(tmp_path / "arm")) is True
    assert runtime.cpu_has_bf16.__wrapped__(str(tmp_path / "missing")) is None
    monkeypatch.setattr(runtime, "fast_bf16", lambda device: pytest.fail("probed although the flags said"))
    for has in (True, False):
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda has=has: has)
        assert Generator(model_dir).dtype == ("bf16" if has else "fp32")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: None)
    monkeypatch.setattr(runtime, "fast_bf16", lambda device: True)
    assert Generator(model_dir).dtype == "bf16"


@pytest.mark.parametrize("use_native", [None, False])
def test_sequences_joining_at_different_times_decode_as_if_alone(model_dir, use_native):
    """Continuous batching's step: rows at their own cache slots, prompts prefilled in chunks, give transformers'
    greedy tokens for each sequence, and a row's logits are the same whatever else is in the step."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    dec = LlamaDecoder(hf, torch.float32, use_native=use_native)
    if use_native is None and dec.native is None:
        pytest.skip(f"no compiled step here: {native.why_not()}")
    cache = dec.new_cache(4, 64)
    prompts, rows = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15, 16, 17, 18, 19], [20]], [2, 0, 3, 1]
    seqs = []
    for p, r in zip(prompts, rows):   # in chunks of 3, as the engine would
        for start in range(0, len(p), 3):
            chunk = p[start:start + 3]
            logits = dec.step_rows(chunk, [r] * len(chunk), list(range(start, start + len(chunk))), cache,
                                   [len(chunk) - 1])
        seqs.append(p + [int(logits.argmax())])
    for _ in range(6):
        live = range(len(seqs)) if len(seqs[0]) < 11 else range(1, len(seqs))  # the first leaves early
        logits = dec.step_rows([seqs[i][-1] for i in live], [rows[i] for i in live],
                               [len(seqs[i]) - 1 for i in live], cache)
        for i, t in zip(live, logits.argmax(-1).tolist()):
            seqs[i].append(t)
    for p, s in zip(prompts, seqs):
        want = hf.generate(torch.tensor([p]), max_new_tokens=len(s) - len(p), do_sample=False)[0].tolist()
        assert s == want
    alone = dec.step_rows([seqs[1][-1]], [0], [len(seqs[1]) - 1], cache)
    together = dec.step_rows([seqs[3][-1], seqs[1][-1]], [1, 0], [len(seqs[3]) - 1, len(seqs[1]) - 1], cache)
    if dec.native is not None:
        assert torch.equal(alone[0], together[1])
    else:
        torch.testing.assert_close(alone[0], together[1])
    with pytest.raises(IndexError):
        dec.step_rows([1, 2], [0, 0], [3, 3], cache)   # two tokens for one slot


@pytest.mark.parametrize("use_native", [None, False])
def test_prompts_prefilled_inside_the_step_decode_as_if_alone(model_dir, use_native):
    """Prompt chunks and decoding rows in one step_rows call (a row repeated at consecutive slots) give
    transformers' greedy tokens; in the compiled step a sequence's logits are the same bits however its prompt was
    split and whatever shared its calls."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    dec = LlamaDecoder(hf, torch.float32, use_native=use_native)
    if use_native is None and dec.native is None:
        pytest.skip(f"no compiled step here: {native.why_not()}")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21], [20]]

    def run(chunk: int, order: list[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Sequences join in `order`, one per call, each call prefilling up to `chunk` prompt tokens of the
        waiting ones next to one token of every decoding one."""
        cache = dec.new_cache(4, 64, width=4 + chunk)
        seqs, done, first = {}, {i: 0 for i in order}, {}
        waiting = []
        for call in range(40):
            if call < len(order):
                waiting.append(order[call])
            ids, rows, slots, want, owners = [], [], [], [], []
            for i, s in seqs.items():
                if len(s) < len(prompts[i]) + 6:
                    ids.append(s[-1]), rows.append(i), slots.append(len(s) - 1), want.append(len(ids) - 1)
                    owners.append(i)
            budget = chunk
            for i in list(waiting):
                take = prompts[i][done[i]:done[i] + budget]
                for j, t in enumerate(take):
                    ids.append(t), rows.append(i), slots.append(done[i] + j)
                done[i] += len(take)
                budget -= len(take)
                if done[i] == len(prompts[i]):
                    want.append(len(ids) - 1), owners.append(i)
                    waiting.remove(i)
                if budget <= 0:
                    break
            if not ids:
                break
            logits = dec.step_rows(ids, rows, slots, cache, want)
            for i, row in zip(owners, logits):
                if i in seqs:
                    seqs[i].append(int(row.argmax()))
                else:
                    seqs[i], first[i] = prompts[i] + [int(row.argmax())], row
        return [seqs[i] for i in range(len(prompts))], [first[i] for i in range(len(prompts))]

    a, fa = run(3, [0, 1, 2, 3])
    b, fb = run(5, [2, 3, 1, 0])
    for p, s in zip(prompts, a):
        assert s == hf.generate(torch.tensor([p]), max_new_tokens=len(s) - len(p), do_sample=False)[0].tolist()
    assert a == b
    for x, y in zip(fa, fb):
        if dec.native is not None:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y)
