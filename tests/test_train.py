import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fmkit.config import TrainConfig
from fmkit.errors import FmkitError
from fmkit.train import checkpoint as ckpt
from fmkit.train.loop import TrainingInterrupted, lr_at
from fmkit.train.metrics import read_metrics
from fmkit.train.pretrain import pretrain

from conftest import tiny_overrides


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_interrupted_then_resumed_run_is_bit_identical(tmp_path, shards_dir):
    straight = pretrain(None, tiny_overrides(shards_dir, tmp_path / "a"))

    def interrupt(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="interrupted at step 4"):
        pretrain(None, tiny_overrides(shards_dir, tmp_path / "b"), on_log=interrupt)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-000003", "step-000004"]
    resumed = pretrain(None, tiny_overrides(shards_dir, tmp_path / "b"), resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in read_metrics(straight) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(resumed) if "loss" in r]
    assert la == lb  # metrics.jsonl holds one line per step after the resume, the same values


def test_resume_keeps_the_precision_auto_chose_at_the_start(tmp_path, shards_dir, monkeypatch):
    from fmkit.train import loop

    auto = tiny_overrides(shards_dir, tmp_path / "a", **{"train.precision": "auto"})
    monkeypatch.setattr(loop, "choose_precision", lambda requested, device: "fp32")
    straight = pretrain(None, auto)

    def interrupt(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    b = {**auto, "out": str(tmp_path / "b")}
    with pytest.raises(TrainingInterrupted):
        pretrain(None, b, on_log=interrupt)
    monkeypatch.setattr(loop, "choose_precision", lambda requested, device: "bf16")  # the machine now says bf16
    resumed = pretrain(None, b, resume=True)
    a, r = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], r[k]) for k in a)


def test_checkpoint_killed_mid_write_leaves_previous_loadable(tmp_path, shards_dir):
    out = tmp_path / "m"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from fmkit.train.pretrain import pretrain
        from fmkit.train import checkpoint
        real_save = torch.save
        def dying_save(obj, path, *a, **k):
            if "step-000006" in str(path):
                with open(path, "wb") as f:
                    f.write(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *a, **k)
        torch.save = dying_save
        pretrain(None, {tiny_overrides(shards_dir, out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    found = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in found] == ["step-000003"]
    assert list((out / "checkpoints").glob(".step-000006.tmp"))
    loaded = ckpt.read_checkpoint(found[-1])
    assert loaded["state"]["step"] == 3 and loaded["model"]
    resumed = pretrain(None, tiny_overrides(shards_dir, out), resume=True)
    assert (resumed / "model.safetensors").exists()
    assert not list((out / "checkpoints").glob(".step-*.tmp"))


def test_resume_with_a_different_shape_is_refused(tmp_path, shards_dir):
    out = tmp_path / "m"
    pretrain(None, tiny_overrides(shards_dir, out, **{"train.steps": 3}))
    with pytest.raises(FmkitError, match="trained with hidden_size=64, but this recipe builds hidden_size=32"):
        pretrain(None, tiny_overrides(shards_dir, out, **{"train.steps": 6, "model.overrides.hidden_size": 32}),
                 resume=True)


def test_corrupt_checkpoint_is_reported(tmp_path, shards_dir):
    out = tmp_path / "m"
    pretrain(None, tiny_overrides(shards_dir, out, **{"train.steps": 3}))
    weights = out / "checkpoints" / "step-000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(FmkitError, match="step-000003/model.safetensors is truncated or corrupt"):
        pretrain(None, tiny_overrides(shards_dir, out, **{"train.steps": 6}), resume=True)


def test_existing_checkpoints_need_resume_and_resume_needs_checkpoints(tmp_path, shards_dir):
    out = tmp_path / "m"
    with pytest.raises(FmkitError, match="no checkpoint"):
        pretrain(None, tiny_overrides(shards_dir, out), resume=True)
    pretrain(None, tiny_overrides(shards_dir, out, **{"train.steps": 3}))
    with pytest.raises(FmkitError, match="already has checkpoints; pass --resume"):
        pretrain(None, tiny_overrides(shards_dir, out))


def test_seq_len_above_positions_and_wrong_objective(tmp_path, shards_dir, tokenizer_dir):
    from fmkit.models.build import build_model, model_config
    from fmkit.models.io import save_model

    parent = tmp_path / "parent"
    save_model(build_model(model_config("decoder", "tiny", 512, 16, {"pad": 1, "eos": 0})), parent, tokenizer_dir, {})
    with pytest.raises(FmkitError, match="train.seq_len=32 is above the model's 16 positions"):
        pretrain(None, tiny_overrides(shards_dir, tmp_path / "m", **{"model.init_from": str(parent)}))
    with pytest.raises(FmkitError, match="masked_lm does not fit a decoder"):
        pretrain(None, tiny_overrides(shards_dir, tmp_path / "m", **{"train.objective": "masked_lm"}))


def test_continued_pretraining_records_the_parent(tmp_path, shards_dir):
    from fmkit.workspace import Workspace, read_manifest

    parent = pretrain(None, tiny_overrides(shards_dir, tmp_path / "p", **{"train.steps": 3}))
    child = pretrain(None, tiny_overrides(shards_dir, tmp_path / "c", **{"train.steps": 3,
                                                                         "model.init_from": str(parent)}))
    m = read_manifest(child)
    assert m["parent_id"] == read_manifest(parent)["id"] and m["tokens_seen"] == 3 * 4 * 32
    ws = Workspace(tmp_path / "ws")
    ancestry = ws.lineage(m["id"])
    assert read_manifest(parent)["id"] in ancestry and read_manifest(shards_dir)["id"] in ancestry


def test_activation_checkpointing_gives_the_same_losses(tmp_path, shards_dir):
    plain = pretrain(None, tiny_overrides(shards_dir, tmp_path / "a", **{"train.steps": 3}))
    ac = pretrain(None, tiny_overrides(shards_dir, tmp_path / "b", **{"train.steps": 3,
                                                                      "train.activation_checkpointing": True}))
    la = [r["loss"] for r in read_metrics(plain) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(ac) if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path, shards_dir):
    out = pretrain(None, tiny_overrides(shards_dir, tmp_path / "m", **{"train.steps": 3,
                                                                       "data.val_shards": str(shards_dir)}))
    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= records[1].keys()
    assert {"val_loss", "val_ppl", "val_bpb"} <= records[0].keys() and records[0]["step"] == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_compiled_blocks_train(tmp_path, shards_dir):
    out = pretrain(None, tiny_overrides(shards_dir, tmp_path / "m", **{"train.steps": 3, "train.compile": True}))
    assert len([r for r in read_metrics(out) if "loss" in r]) == 3


def test_trainer_state_round_trips_through_a_checkpoint_with_the_grad_scaler(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmkit.train.loop import _optimizer

    def parts(seed):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, tie_word_embeddings=True))
        optimizer = _optimizer(model, TrainConfig(lr=1e-2))
        # fp16 training scales losses on CUDA; the CPU scaler has the same state, so the path is tested here
        return model, optimizer, torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)

    model, optimizer, scaler = parts(0)
    x = torch.randint(0, 64, (2, 8))
    for step in range(3):   # an overflow (the scale backs off), then steps that count towards growth
        loss = model(input_ids=x, labels=x).loss * (float("inf") if step == 0 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    state = ckpt.TrainerState(model, optimizer, scaler, "fp16", {"run": {"run_id": "r1"}})
    state.step, state.tokens_seen = 3, 48
    ckpt.save_checkpoint(tmp_path, state.state_dict())
    after_save = torch.rand(4)

    restored = ckpt.TrainerState(*parts(1), "fp16")
    restored.load_state_dict(ckpt.read_checkpoint(tmp_path / "step-000003"))
    assert scaler.state_dict()["scale"] == 512.0 and scaler.state_dict()["_growth_tracker"] == 2
    assert restored.scaler.state_dict() == scaler.state_dict()
    assert (restored.step, restored.tokens_seen) == (3, 48)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.model.state_dict().values()))
    moments = [(s["exp_avg"], r["exp_avg"]) for s, r in zip(optimizer.state.values(),
                                                            restored.optimizer.state.values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    assert torch.equal(torch.rand(4), after_save)   # the RNG continues where the saved run was
