"""Each architecture starts at the loss of a uniform guess and soon learns more than token frequencies."""
import math

import numpy as np
import pytest

from fmkit.tokenize.shards import TokenShards
from fmkit.train.metrics import read_metrics
from fmkit.train.pretrain import pretrain

from conftest import tiny_overrides

# Masked LM learns from only the 15% masked tokens, so it needs the most steps to get past the unigram entropy.
STEPS = {"decoder": 100, "encoder": 300, "encoder-decoder": 100}


def unigram_entropy(shards: TokenShards) -> float:
    """Entropy in nats of the shards' token frequencies: the loss of a model that ignores context."""
    counts = sum(np.bincount(a, minlength=shards.vocab_size) for a in shards.arrays)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("arch", list(STEPS))
def test_step0_loss_is_ln_vocab_and_a_short_run_beats_the_unigram_entropy(tmp_path, shards_dir, arch):
    # Validation reads the training shards (the only ones the session builds); a model this small cannot
    # memorise their 187k tokens in a few hundred steps, so beating the unigram entropy means it uses context.
    out = tmp_path / "m"
    steps = STEPS[arch]
    pretrain(None, tiny_overrides(shards_dir, out, **{
        "model.arch": arch, "data.val_shards": str(shards_dir), "train.steps": steps, "train.batch_size": 16,
        "train.warmup_steps": 5, "train.eval_every": steps, "train.eval_batches": 16, "train.log_every": steps,
        "train.save_every": 0}))
    val = {r["step"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}
    shards = TokenShards(shards_dir)
    ln_vocab = math.log(shards.vocab_size)
    assert abs(val[0] - ln_vocab) < 0.1 * ln_vocab, (val, ln_vocab)
    assert val[steps] < unigram_entropy(shards), (val, unigram_entropy(shards))
