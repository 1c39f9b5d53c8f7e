"""Step-indexed batches: the batch for (step, micro-batch, rank) is a pure function of the seed.

So the data position is just the step, resume replays nothing, and one process with gradient accumulation sees
exactly the examples that N processes see together. Every kind of batch the loop trains on (pre-training windows,
SFT conversations, DPO pairs, labelled texts) follows the `Batches` protocol and draws through `StepBatches`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..tokenize.shards import TokenShards


@runtime_checkable
class Batches(Protocol):
    """What the loop trains on.

    A step's global batch (`global_batch` = batch_size x grad_accum x world examples) is fixed by (seed, step);
    `get(step, micro)` returns this rank's share of micro-batch `micro` as the objective's input dict. A batch may
    carry `loss_weight`: the factor that makes the step's gradient the mean over the whole global batch's targets
    when micro-batches hold different numbers of them (variable-length SFT examples); without it, 1.
    `tokens_per_step` is how many tokens a step holds (on average, for variable-length examples), for throughput.
    """

    batch_size: int
    grad_accum: int
    rank: int
    world: int

    @property
    def global_batch(self) -> int: ...

    @property
    def tokens_per_step(self) -> int: ...

    def get(self, step: int, micro: int) -> dict: ...


class StepBatches:
    """The drawing and splitting every `Batches` shares: the step's global batch is drawn once from (seed, step)
    and cut into grad_accum x world equal parts; part `micro * world + rank` is this rank's share of `micro`."""

    def __init__(self, batch_size: int, grad_accum: int = 1, seed: int = 0, rank: int = 0, world: int = 1):
        self.batch_size, self.grad_accum, self.seed, self.rank, self.world = batch_size, grad_accum, seed, rank, world

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step])

    def part(self, micro: int) -> int:
        return micro * self.world + self.rank

    def share(self, drawn, micro: int):
        """This rank's rows of micro-batch `micro`, out of the step's global batch `drawn`."""
        part = self.part(micro)
        return drawn[part * self.batch_size:(part + 1) * self.batch_size]

    def draw(self, step: int, n: int) -> np.ndarray:
        """Indices of the step's global batch among `n` examples (repeats only when there are fewer than it)."""
        return self.rng(step).choice(n, size=self.global_batch, replace=n < self.global_batch)


class PretrainBatches(StepBatches):
    """Random windows of `seq_len + 1` tokens from token shards, split across ranks and micro-batches."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world: int = 1, extra: dict | None = None):
        super().__init__(batch_size, grad_accum, seed, rank, world)
        self.shards, self.seq_len = shards, seq_len
        self.extra = extra or {}

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def get(self, step: int, micro: int) -> dict:
        windows = self.shards.sample(self.rng(step), self.global_batch, self.seq_len + 1)
        seed = hash((self.seed, step, self.part(micro))) & 0x7FFFFFFF
        return {"tokens": torch.from_numpy(self.share(windows, micro)), "seed": seed, **self.extra}

    def validation(self, max_batches: int) -> list[dict]:
        """This rank's share of the fixed validation windows (every rank gets the same number of batches)."""
        all_batches = self.shards.sequential(self.batch_size, self.seq_len + 1, max_batches)
        usable = len(all_batches) // self.world * self.world or len(all_batches)
        mine = all_batches[:usable][self.rank::self.world]
        return [{"tokens": torch.from_numpy(b), "seed": i, **self.extra} for i, b in enumerate(mine)]
