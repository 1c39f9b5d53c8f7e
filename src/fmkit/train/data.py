"""Step-indexed batches: the batch for (step, micro-batch, rank) is a pure function of the seed.

So the data position is just the step, resume replays nothing, and one process with gradient accumulation sees
exactly the windows that N processes see together.
"""
from __future__ import annotations

import numpy as np
import torch

from ..tokenize.shards import TokenShards


class PretrainBatches:
    """Random windows of `seq_len + 1` tokens from token shards, split across ranks and micro-batches."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world: int = 1, extra: dict | None = None):
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.grad_accum, self.seed, self.rank, self.world = grad_accum, seed, rank, world
        self.extra = extra or {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world * self.grad_accum

    def get(self, step: int, micro: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        windows = self.shards.sample(rng, self.global_batch, self.seq_len + 1)
        part = micro * self.world + self.rank
        rows = windows[part * self.batch_size:(part + 1) * self.batch_size]
        return {"tokens": torch.from_numpy(rows), "seed": hash((self.seed, step, part)) & 0x7FFFFFFF, **self.extra}

    def validation(self, max_batches: int) -> list[dict]:
        """This rank's share of the fixed validation windows (every rank gets the same number of batches)."""
        all_batches = self.shards.sequential(self.batch_size, self.seq_len + 1, max_batches)
        usable = len(all_batches) // self.world * self.world or len(all_batches)
        mine = all_batches[:usable][self.rank::self.world]
        return [{"tokens": torch.from_numpy(b), "seed": i, **self.extra} for i, b in enumerate(mine)]
