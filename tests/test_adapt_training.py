"""What the adaptation verbs share: resume from the newest checkpoint, and a registry run that says whether
training finished or failed (with the error)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fmkit.train.loop import TrainingInterrupted
from fmkit.workspace import Workspace


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer_dir):
    from conftest import save_fmkit_llama

    return save_fmkit_llama(tokenizer_dir, tmp_path_factory.mktemp("llama") / "model", 128)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tokenizer_dir):
    """A seeded one-layer BERT with the session tokenizer; its dropout (BERT's default 0.1) draws from the RNG, so
    resuming it exactly needs the RNG restored."""
    from transformers import BertConfig, BertModel

    from fmkit.models.io import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    folder = tmp_path_factory.mktemp("bert") / "encoder"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
              ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    pairs = [{"prompt": f"Task {i}?", "chosen": "Sure, here it is.", "rejected": "No."} for i in range(6)]
    (d / "pairs.jsonl").write_text("\n".join(map(json.dumps, pairs)))
    texts = [{"text": f"the {w} thing {i}", "label": w} for i in range(6) for w in ("good", "bad")]
    (d / "labels.jsonl").write_text("\n".join(map(json.dumps, texts)))
    chats = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}]}
             for i in range(6)]
    (d / "chats.jsonl").write_text("\n".join(map(json.dumps, chats)))
    return d


def run_dpo(llama, files, out, ws, **kw):
    from fmkit.adapt.dpo import dpo

    return dpo(llama, files / "pairs.jsonl", out, steps=4, batch_size=2, grad_accum=2, lr=1e-3, workspace=ws,
               log_every=1, **kw)


def run_classifier(encoder, files, out, ws, **kw):
    from fmkit.adapt.classify import train_classifier

    return train_classifier(encoder, files / "labels.jsonl", out, lora=True, steps=4, batch_size=2, grad_accum=2,
                            max_len=16, workspace=ws, log_every=1, **kw)


@pytest.mark.parametrize("verb", ["dpo", "classify"])
def test_a_stopped_and_resumed_run_ends_where_a_straight_one_does(tmp_path, monkeypatch, llama, encoder, files,
                                                                  verb):
    from fmkit.adapt.classify import ClassBatches
    from fmkit.adapt.dpo import PairBatches

    ws = tmp_path / "ws"
    if verb == "dpo":
        batches, weights = PairBatches, "model.safetensors"
        run = lambda out, **kw: run_dpo(llama, files, out, ws, **kw)   # noqa: E731
    else:
        batches, weights = ClassBatches, "adapter_model.safetensors"
        run = lambda out, **kw: run_classifier(encoder, files, out, ws, **kw)   # noqa: E731
    straight = run(tmp_path / "straight")

    real_get = batches.get

    def stop_at_step_2(self, step, micro):
        if step == 2:
            raise KeyboardInterrupt
        return real_get(self, step, micro)

    monkeypatch.setattr(batches, "get", stop_at_step_2)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 2"):
        run(tmp_path / "resumed")
    monkeypatch.undo()
    resumed = run(tmp_path / "resumed", resume=True)

    a, b = load_file(straight / weights), load_file(resumed / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines())]
              for o in (straight, resumed)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    statuses = [r["status"] for r in Workspace(ws).runs()]
    assert statuses == ["finished", "failed", "finished"]   # the interrupted run is recorded as failed


def test_an_existing_output_needs_resume(tmp_path, llama, files):
    from fmkit.errors import FmkitError

    run_dpo(llama, files, tmp_path / "out", tmp_path / "ws")
    with pytest.raises(FmkitError, match="already has checkpoints; pass --resume"):
        run_dpo(llama, files, tmp_path / "out", tmp_path / "ws")


@pytest.mark.parametrize("verb", ["finetune", "dpo", "classify"])
def test_a_run_that_fails_in_training_is_marked_failed_with_its_error(tmp_path, monkeypatch, llama, encoder, files,
                                                                      verb):
    from fmkit.adapt import classify, dpo, finetune

    def broken(model, batch):
        raise RuntimeError("objective broke")

    monkeypatch.setattr(finetune, "sft_objective", broken)
    monkeypatch.setattr(dpo, "dpo_objective", lambda beta: broken)
    monkeypatch.setattr(classify, "classification_objective", broken)
    out, ws = tmp_path / "out", tmp_path / "ws"
    with pytest.raises(RuntimeError, match="objective broke"):
        if verb == "finetune":
            finetune.finetune(llama, files / "chats.jsonl", out, steps=2, workspace=ws)
        elif verb == "dpo":
            run_dpo(llama, files, out, ws)
        else:
            run_classifier(encoder, files, out, ws)
    (run,) = Workspace(ws).runs()
    assert run["status"] == "failed" and run["error"] == "RuntimeError: objective broke" and run["finished"]
    assert not (out / "fmkit.json").exists()
