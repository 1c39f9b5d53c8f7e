"""Recipes: dataclasses loaded from YAML, with `--section.key=value` overrides from the command line."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import FmkitError


@dataclass
class DataConfig:
    shards: str = ""          # token shards folder written by `fmkit pack`
    val_shards: str = ""      # held-out shards for validation loss / bits-per-byte (optional)


@dataclass
class ModelConfig:
    arch: str = "decoder"     # decoder | encoder | encoder-decoder
    preset: str = "1m"        # size preset from models/presets.yaml
    init_from: str = ""       # a model folder to continue pre-training from (its shape wins over the preset)
    overrides: dict = field(default_factory=dict)  # transformers config fields, e.g. {num_key_value_heads: 2}


@dataclass
class TrainConfig:
    objective: str = "auto"   # causal_lm | masked_lm | span_corruption; auto picks the one that fits the arch
    steps: int = 1000
    batch_size: int = 16      # sequences per micro-batch per process
    grad_accum: int = 1       # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0    # 0 disables clipping
    precision: str = "auto"   # auto | fp32 | bf16 | fp16 (fp16 only on GPUs, with a grad scaler)
    compile: bool = False     # torch.compile each transformer block
    activation_checkpointing: bool = False
    parallel: str = "ddp"     # ddp | fsdp: how to use the processes torchrun starts
    device: str = "auto"      # auto | cpu | cuda
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500     # 0: only the last step
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0

    def check(self) -> "TrainConfig":
        """Refuse settings that would crash mid-run or train nothing, naming the setting."""
        least = {"steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 2, "eval_every": 1, "eval_batches": 1,
                 "save_every": 0, "log_every": 1, "warmup_steps": 0, "keep_last": 0}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise FmkitError(f"train.{name} must be at least {low}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise FmkitError(f"train.lr must be more than 0, got {self.lr}")
        return self


@dataclass
class Recipe:
    name: str = "model"
    workspace: str = ""       # default: $FMKIT_WORKSPACE or ./fmkit-workspace
    out: str = ""             # model folder; default <workspace>/models/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            out += _keys(f.default_factory, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def unknown_key(key: str, where: str, known: list[str]) -> FmkitError:
    """'unknown recipe key ... did you mean ...?': the error for a key that is not in `known`."""
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(known)}"
    return FmkitError(f"unknown recipe key '{key}' in {where}{hint}")


def _coerce(value, typ, key: str, where: str):
    if typ is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
    elif typ in (dict, list) and isinstance(value, str):
        value = yaml.safe_load(value)
    try:
        if typ in (dict, list):
            if not isinstance(value, typ):
                raise ValueError
            return value
        if typ is str:
            return "" if value is None else str(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if typ in (int, float) and isinstance(value, str):
            value = float(value)
            if typ is int and not value.is_integer():
                raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise FmkitError(f"recipe key '{key}' in {where} must be {typ.__name__}, got {value!r}") from None


def _set(obj, key: str, value, where: str, prefix: str = "", root=None) -> None:
    """Set `key` (dotted, relative to obj) to value; a mapping value sets each of its keys in turn."""
    root = root or type(obj)
    head, _, rest = key.partition(".")
    full = prefix + head
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        raise unknown_key(prefix + key, where, _keys(root))
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            return _set(current, rest, value, where, full + ".", root)
        if not isinstance(value, dict):
            raise FmkitError(f"recipe section '{full}' in {where} must be a mapping, got {value!r}")
        for k, v in value.items():
            _set(current, str(k), v, where, full + ".", root)
        return
    if rest:
        if isinstance(current, dict):  # model.overrides.hidden_size=...: free-form, checked by the model builder
            current[rest] = yaml.safe_load(value) if isinstance(value, str) else value
            return
        raise unknown_key(prefix + key, where, _keys(root))
    setattr(obj, head, _coerce(value, typing.get_type_hints(type(obj))[head], full, where))


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict | None = None, cls=None):
    """Read a YAML recipe (or start from defaults) and apply `section.key=value` overrides.

    `cls` is the recipe dataclass (default: the pre-training `Recipe`; curation passes its own)."""
    recipe = (cls or Recipe)()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FmkitError(f"recipe file not found: {p}")
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise FmkitError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(doc, dict):
            raise FmkitError(f"recipe {p} must be a mapping of sections, got {type(doc).__name__}")
        for k, v in doc.items():
            _set(recipe, k, v, str(p))
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides or [])
    for k, v in items:
        _set(recipe, k, v, "the command line")
    return recipe


def _split(arg: str) -> tuple[str, str]:
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        raise FmkitError(f"override '{arg}' must look like --section.key=value (e.g. --train.lr=3e-4)")
    k, v = body.split("=", 1)
    return k.replace("-", "_"), v


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as plain data, for fmkit.json and the registry."""
    return dataclasses.asdict(recipe)
