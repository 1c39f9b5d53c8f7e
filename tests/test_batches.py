"""The Batches contract, held for every kind of batch the loop trains on: a step's global batch is the same
however it is split over ranks and micro-batches, the parts never overlap, and accumulating micro-batches gives
the gradient of the whole batch."""
import pytest
import torch

from fmkit.config import TrainConfig
from fmkit.train import parallel
from fmkit.train.data import Batches

LAYOUTS = [(8, 1, 1), (4, 1, 2), (4, 2, 1), (2, 2, 2)]   # (batch_size, grad_accum, world): 8 examples a step


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from fmkit.models.io import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def chats(tok):
    """Tokenised conversations of different lengths, so micro-batches hold different numbers of targets."""
    from fmkit.adapt.chat_template import encode_chat

    return [encode_chat(tok, [{"role": "user", "content": f"What is {i} times {i % 7}?"},
                              {"role": "assistant", "content": "It is " + " and ".join(["many"] * (1 + i % 5))}])
            for i in range(40)]


def pretrain_batches(shards_dir, **split):
    from fmkit.tokenize.shards import TokenShards
    from fmkit.train.data import PretrainBatches

    return PretrainBatches(TokenShards(shards_dir), split["batch_size"], 16, split["grad_accum"], 3, split["rank"],
                           split["world"])


def sft_batches(chats, **split):
    from fmkit.adapt.finetune import SFTBatches

    return SFTBatches(chats, split["batch_size"], split["grad_accum"], 3, 0, split["rank"], split["world"])


def pair_batches(chats, **split):
    from fmkit.adapt.dpo import PairBatches

    pairs = [(chats[i], chats[(i + 1) % len(chats)]) for i in range(len(chats))]
    return PairBatches(pairs, torch.zeros(len(pairs), 2), split["batch_size"], split["grad_accum"], 3, 0,
                       split["rank"], split["world"])


def class_batches(tok, **split):
    from fmkit.adapt.classify import ClassBatches

    rows = [(f"note {i}: " + "word " * (i % 6), "yes" if i % 3 else "no") for i in range(40)]
    return ClassBatches(tok, rows, ["no", "yes"], 32, split["batch_size"], split["grad_accum"], 3, split["rank"],
                        split["world"])


def examples(batch: dict) -> list[tuple]:
    """The examples a batch holds, each as its tuple of tokens (without padding; chosen answers for pairs)."""
    if "attention_mask" not in batch:   # pre-training windows
        return [tuple(row.tolist()) for row in batch["tokens"]]
    ids, keep = batch["input_ids"], batch["attention_mask"].bool()
    if "ref" in batch:
        ids, keep = ids[:len(ids) // 2], keep[:len(ids) // 2]
    return [tuple(row[k].tolist()) for row, k in zip(ids, keep)]


@pytest.fixture(params=["pretrain", "sft", "pairs", "classes"])
def make(request, shards_dir, chats, tok):
    build = {"pretrain": lambda **s: pretrain_batches(shards_dir, **s), "sft": lambda **s: sft_batches(chats, **s),
             "pairs": lambda **s: pair_batches(chats, **s), "classes": lambda **s: class_batches(tok, **s)}
    return build[request.param]


def test_every_split_of_a_step_holds_the_same_examples_without_overlap(make):
    for step in (0, 7):
        whole = None
        for batch_size, grad_accum, world in LAYOUTS:
            ranks = [make(batch_size=batch_size, grad_accum=grad_accum, rank=r, world=world) for r in range(world)]
            assert all(isinstance(b, Batches) and b.global_batch == 8 for b in ranks)
            parts = [examples(b.get(step, micro)) for micro in range(grad_accum) for b in ranks]
            assert all(len(p) == batch_size for p in parts)
            union = sorted(e for p in parts for e in p)
            assert len(set(union)) == 8, (batch_size, grad_accum, world)         # no example in two parts
            whole = whole or union
            assert union == whole, (batch_size, grad_accum, world)              # the one-process global batch
        assert ranks[0].tokens_per_step == make(batch_size=8, grad_accum=1, rank=0, world=1).tokens_per_step


def test_the_loop_refuses_batches_split_for_another_layout(tmp_path, chats):
    from fmkit.train.loop import train

    batches = sft_batches(chats, batch_size=4, grad_accum=1, rank=0, world=1)
    with pytest.raises(ValueError, match="batches are split for grad_accum=1.*this run has grad_accum=2"):
        train(torch.nn.Linear(2, 2), None, batches, TrainConfig(grad_accum=2, device="cpu"), tmp_path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer_dir, tok):
    from conftest import save_tiny_llama

    return save_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("llama") / "model", 128,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def step_gradient(folder, objective, batches, grad_accum: int) -> torch.Tensor:
    """The gradient one optimizer step of the loop leaves, from a fresh copy of the model."""
    from fmkit.models.io import load_model
    from fmkit.train.loop import accumulate

    model = load_model(folder).train()
    d = parallel.Dist()
    accumulate(parallel.wrap(model, objective, "ddp", d), batches, 5, TrainConfig(grad_accum=grad_accum), d, "fp32")
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("packed", [False, True])
def test_accumulating_sft_micro_batches_gives_the_whole_batch_gradient(llama, chats, packed):
    from fmkit.adapt.finetune import SFTBatches, sft_objective

    whole = step_gradient(llama, sft_objective, SFTBatches(chats, 8, 1, 3, 0, packed=packed), 1)
    split = step_gradient(llama, sft_objective, SFTBatches(chats, 4, 2, 3, 0, packed=packed), 2)
    assert torch.allclose(whole, split, rtol=1e-4, atol=1e-6)


def test_accumulating_dpo_micro_batches_gives_the_whole_batch_gradient(llama, chats):
    from fmkit.adapt.dpo import dpo_objective

    objective = dpo_objective(0.1)
    whole = step_gradient(llama, objective, pair_batches(chats, batch_size=8, grad_accum=1, rank=0, world=1), 1)
    split = step_gradient(llama, objective, pair_batches(chats, batch_size=4, grad_accum=2, rank=0, world=1), 2)
    assert torch.allclose(whole, split, rtol=1e-4, atol=1e-6)
