import pytest
import torch

from fmkit.train.loss import IGNORE_INDEX
from fmkit.train.metrics import read_metrics
from fmkit.train.objectives import mask_tokens, span_corrupt
from fmkit.train.pretrain import pretrain

from conftest import tiny_overrides


def test_masking_follows_bert_proportions():
    tokens = torch.randint(10, 1000, (64, 512))
    inputs, labels = mask_tokens(tokens, mask_id=3, vocab_size=1000, generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.float().mean() - 0.15) < 0.01
    assert torch.equal(labels[chosen], tokens[chosen])
    masked = (inputs == 3) & chosen
    kept = (inputs == tokens) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.02 + 0.001  # random replacements may hit the same token
    assert torch.equal(inputs[~chosen], tokens[~chosen])


def test_span_corruption_round_trips():
    tokens = torch.arange(100, 164).repeat(3, 1)
    sentinels = list(range(10, 30))
    inputs, labels = span_corrupt(tokens, sentinels, eos_id=0, pad_id=1, generator=torch.Generator().manual_seed(0))
    for row in range(3):
        inp = [t for t in inputs[row].tolist() if t != 1]
        out = [t for t in labels[row].tolist() if t != IGNORE_INDEX]
        assert inp[-1] == 0 and out[-1] == 0
        spans, current = {}, None  # rebuild the original by replacing each sentinel with the span it hid
        for t in out[:-1]:
            if t in sentinels:
                current = t
                spans[t] = []
            else:
                spans[current].append(t)
        rebuilt = [x for t in inp[:-1] for x in (spans[t] if t in sentinels else [t])]
        assert rebuilt == tokens[row].tolist()
        assert abs(sum(map(len, spans.values())) - round(64 * 0.15)) <= 1


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_each_objective_lowers_loss(tmp_path, shards_dir, arch):
    out = tmp_path / "m"
    pretrain(None, tiny_overrides(shards_dir, out, **{"model.arch": arch, "train.steps": 40, "train.save_every": 0,
                                                      "train.log_every": 40, "train.warmup_steps": 5}))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
