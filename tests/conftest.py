"""Shared fixtures: a small tokenizer and token shards built once per test session from held-out stdlib text."""
from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("FMKIT_QUIET", "1")
# the compiled decoding step is built into a fresh cache, so the tests build it themselves rather than reuse one
os.environ.setdefault("FMKIT_CACHE_DIR", tempfile.mkdtemp(prefix="fmkit-test-cache-"))
# verbs called without a workspace use the default one: a temporary folder, never ./fmkit-workspace in the checkout
os.environ.setdefault("FMKIT_WORKSPACE", tempfile.mkdtemp(prefix="fmkit-test-ws-"))


@pytest.fixture(scope="session")
def session_ws(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


@pytest.fixture(scope="session")
def tokenizer_dir(session_ws):
    from fmkit.tokenize.tokenizer import train_tokenizer

    return train_tokenizer("stdlib:val", session_ws / "tok", vocab_size=512, sentinels=8, workspace=session_ws)


@pytest.fixture(scope="session")
def shards_dir(session_ws, tokenizer_dir):
    from fmkit.tokenize.pack import pack

    return pack("stdlib:val", tokenizer_dir, session_ws / "shards", workspace=session_ws)


def tiny_overrides(shards, out, **extra) -> dict:
    """A recipe for a model small enough to train a few steps in about a second."""
    base = {"data.shards": str(shards), "out": str(out), "workspace": str(out.parent / "ws"),
            "model.preset": "tiny", "train.steps": 6, "train.batch_size": 4, "train.seq_len": 32,
            "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 3, "train.save_every": 3,
            "train.keep_last": 0, "train.precision": "fp32", "train.lr": 3e-3}
    base.update(extra)
    return base


def save_tiny_llama(tokenizer_dir, folder, max_positions: int, **config):
    """A seeded 2-layer Llama (hidden 64) with the session tokenizer, saved as a model folder; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmkit.models.io import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      vocab_size=len(tok), max_position_embeddings=max_positions, tie_word_embeddings=True, **config)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_fmkit_llama(tokenizer_dir, folder, max_positions: int):
    """The tiny Llama with the tokenizer's EOS and pad ids, marked as a model fmkit built (fmkit.json), so it may
    be given fmkit's chat template; returns the folder."""
    from fmkit.models.io import load_tokenizer
    from fmkit.workspace import write_manifest

    tok = load_tokenizer(tokenizer_dir)
    save_tiny_llama(tokenizer_dir, folder, max_positions, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    write_manifest(folder, {"kind": "model"})
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Models this small run faster on one thread than on two that other processes keep preempting (a tiny
    matrix product measured 0.16 ms on one thread against 3.7 ms on two on a loaded 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer_dir):
    """The tiny fmkit Llama (128 positions) in a folder of its own, for one test module."""
    return save_fmkit_llama(tokenizer_dir, tmp_path_factory.mktemp("llama") / "model", 128)


def make_adapter(base, out):
    """A LoRA adapter of the model at `base`, saved at `out`, with B initialised so that it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fmkit.workspace import write_manifest

    torch.manual_seed(3)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)   # a LoRA that changes the outputs
    net.save_pretrained(out)
    write_manifest(out, {"kind": "adapter", "parent_model": str(base)})
    return out


@pytest.fixture(scope="session")
def serve_folders(tmp_path_factory, tokenizer_dir):
    """A tiny fmkit Llama ("tiny", 256 positions) and a LoRA adapter of it ("tiny-lora") that changes its outputs."""
    root = tmp_path_factory.mktemp("serve")
    base = save_fmkit_llama(tokenizer_dir, root / "tiny", 256)
    return {"root": root, "base": base, "adapter": make_adapter(base, root / "tiny-lora")}
