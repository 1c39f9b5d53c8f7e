"""Process groups and model wrapping, applied to a model from outside the loop: DDP or FSDP2, compile, AC."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FmkitError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise FmkitError(f"train.device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise FmkitError("train.device=cuda but no GPU is visible; use train.device=cpu")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        # torn down before the interpreter exits: left to the C++ destructors, gloo's threads were seen to abort
        # a rank at exit ("terminate called without an active exception") after a finished run
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Dist(rank, world, local, device)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a transformers model (the unit for FSDP, compile and AC)."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(type(m) is type(module[0]) for m in module):
            found.extend(module)
    return found


class TrainModule(nn.Module):
    """Model + objective as one module, so DDP/FSDP hooks see the whole forward the objective runs."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict):
        return self.objective(self.model, batch)


def wrap(model: nn.Module, objective, mode: str, d: Dist, compile: bool = False,
         activation_checkpointing: bool = False) -> nn.Module:
    """Apply activation checkpointing, compile and DDP/FSDP2 to `model`; returns the module the loop calls."""
    if activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        for block in blocks(model):
            block.compile()
    module = TrainModule(model, objective)
    if d.world == 1:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[d.local_rank] if d.device.startswith("cuda") else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks(model):
            fully_shard(block)
        fully_shard(module)
        return module
    raise FmkitError(f"train.parallel must be ddp or fsdp, got '{mode}'")


def all_mean(values: list[float], d: Dist) -> list[float]:
    """Average floats over ranks (identity in one process)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return (t / d.world).tolist()
