"""Checkpoints: `step-NNNNNN/` with everything a restart needs, made visible only when complete.

What a restart needs is one state dict, `TrainerState.state_dict()` (PyTorch's Stateful idea, as in torchtitan):
model, optimizer, fp16 grad scaler, RNG and where the run is. `save_checkpoint` writes that dict and
`read_checkpoint` returns it, so saving and resuming treat every part the same way.

Files are written into a hidden temporary folder, fsynced, and the folder is renamed into place: a crash mid-write
leaves only the temporary folder, which is never mistaken for a checkpoint and is removed on the next save.
`trainer_state.json` lists every file's size, so a truncated file is caught before any weights are read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import FmkitError

STEP_RE = re.compile(r"^step-(\d{6,})$")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainerState:
    """Model, optimizer, grad scaler (fp16 only), RNG, step and tokens seen, saved and restored as one state dict.

    `meta` (model config, run id) is recorded with each checkpoint for checks and lineage, not restored."""

    def __init__(self, model, optimizer, scaler=None, precision: str = "fp32", meta: dict | None = None):
        self.model, self.optimizer, self.scaler, self.precision = model, optimizer, scaler, precision
        self.meta = meta or {}
        self.step = self.tokens_seen = 0

    def state_dict(self) -> dict:
        """{"model", "optim", "rng": tensors, "state": JSON}; under FSDP every rank must call it (it gathers)."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"model": get_model_state_dict(self.model, options=FULL),
                "optim": get_optimizer_state_dict(self.model, self.optimizer, options=FULL), "rng": rng,
                "state": {**self.meta, "step": self.step, "tokens_seen": self.tokens_seen,
                          "precision": self.precision, "scaler": self.scaler.state_dict() if self.scaler else None}}

    def load_state_dict(self, saved: dict) -> None:
        set_model_state_dict(self.model, saved["model"], options=StateDictOptions(full_state_dict=True, strict=False))
        self.model.tie_weights()
        set_optimizer_state_dict(self.model, self.optimizer, saved["optim"],
                                 options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
        if self.scaler is not None and saved["state"].get("scaler"):
            self.scaler.load_state_dict(saved["state"]["scaler"])
        self.step, self.tokens_seen = saved["state"]["step"], saved["state"]["tokens_seen"]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, saved: dict, keep_last: int = 2) -> Path:
    """Write a `TrainerState.state_dict()` atomically as checkpoint `step-N` and keep only the newest `keep_last`
    (0 keeps all)."""
    root, step = Path(root), saved["state"]["step"]
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    tmp.mkdir()
    save_file(_untie(saved["model"]), tmp / "model.safetensors")
    torch.save(saved["optim"], tmp / "optimizer.pt")
    save_file(saved["rng"], tmp / "rng.safetensors")
    files = {f.name: f.stat().st_size for f in tmp.iterdir()}
    state = {**saved["state"], "files": files}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _untie(state: dict) -> dict:
    """Keep one name per shared tensor (tied embeddings); loading re-ties them."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous().cpu()
    return out


def read_checkpoint(path: str | Path) -> dict:
    """Load and verify a checkpoint folder; returns what `TrainerState.load_state_dict` takes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise FmkitError(f"checkpoint {path} is incomplete or corrupt (unreadable trainer_state.json)") from None
    for name, size in state.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            have = f.stat().st_size if f.is_file() else "missing"
            raise FmkitError(f"checkpoint file {f} is truncated or corrupt ({have} bytes, expected {size}); "
                             "delete that checkpoint folder to resume from the previous one")
    try:
        model = load_file(path / "model.safetensors")
        rng = load_file(path / "rng.safetensors")
        # weights_only: tensors and plain containers only, so loading cannot run code
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise FmkitError(f"checkpoint {path} is corrupt ({str(e).splitlines()[0]})") from None
    return {"state": state, "model": model, "optim": optim, "rng": rng}


def check_same_shape(ckpt: dict, model, where: Path) -> None:
    """Refuse to resume into a model of another shape, naming the config field that differs."""
    saved = ckpt["state"].get("model_config", {})
    current = model.config.to_dict()
    shape_keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "d_model", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "d_kv",
                  "max_position_embeddings", "model_type")
    for key in shape_keys:
        if key in saved and saved[key] != current.get(key):
            raise FmkitError(f"cannot resume from {where}: it was trained with {key}={saved[key]}, but this recipe "
                             f"builds {key}={current.get(key)}; use the same model settings or a new output folder")
    own = model.state_dict()
    for name, tensor in ckpt["model"].items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise FmkitError(f"cannot resume from {where}: {name} has shape {tuple(tensor.shape)} there but "
                             f"{tuple(own[name].shape)} in this model; use the same model settings")
