"""Save models as Hugging Face folders (safetensors) and load them safely: pickle only when trusted explicitly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import FmkitError
from ..workspace import write_manifest
from .build import arch_of, auto_class

PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt")


def save_model(model, folder: str | Path, tokenizer_dir: str | Path | None, manifest: dict) -> Path:
    """Write config.json, model.safetensors, generation_config.json, tokenizer files and fmkit.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_dir:
        for f in Path(tokenizer_dir).iterdir():
            if f.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                shutil.copy2(f, folder / f.name)
    write_manifest(folder, manifest)
    return folder


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def load_state_dict(folder: str | Path, trust_pickle: bool = False) -> dict:
    """The weights of a model folder as a state dict; refuses pickle files unless trust_pickle."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    files = _safetensors_files(folder)
    if files:
        state = {}
        for f in files:
            try:
                state.update(load_file(f))
            except (SafetensorError, OSError, ValueError) as e:
                raise FmkitError(f"{f} is corrupt or truncated ({str(e).splitlines()[0]}); "
                                 "restore it or load an earlier checkpoint") from None
        return state
    pickles = [folder / n for n in PICKLE_NAMES if (folder / n).is_file()]
    if not pickles:
        raise FmkitError(f"no model weights (model.safetensors) in {folder}")
    if not trust_pickle:
        raise FmkitError(f"refusing to load {pickles[0]}: pickle files can run arbitrary code; convert it to "
                         "safetensors, or pass --trust-pickle if you trust where it came from")
    try:
        return torch.load(pickles[0], map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file, reported in one line
        raise FmkitError(f"{pickles[0]} could not be loaded ({type(e).__name__}: {e})") from None


def load_config(folder: str | Path):
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FmkitError(f"{folder} is not a model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise FmkitError(f"{folder / 'config.json'} is not a valid model config ({str(e).splitlines()[0]})") from None


def load_model(folder: str | Path, trust_pickle: bool = False, device: str = "cpu"):
    """Load a model folder (fmkit's or any transformers model on disk) in eval mode."""
    config = load_config(folder)
    config._attn_implementation = "sdpa"
    model = auto_class(arch_of(config)).from_config(config)
    load_weights(model, load_state_dict(folder, trust_pickle), str(folder))
    return model.to(device).eval()


def load_weights(model, state: dict, where: str) -> None:
    """Copy `state` into `model`, allowing only tied weights (saved once) to be absent; shapes must match."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise FmkitError(f"{where}: weight {name} has shape {tuple(tensor.shape)} but the model expects "
                             f"{tuple(own[name].shape)}; the checkpoint is from a different model shape")
    result = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise FmkitError(f"{where}: weights do not match the model config (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    model.tie_weights()


def _tied_names(model) -> set[str]:
    """Parameter names that share storage with an earlier name (saved once by save_pretrained)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
            tied.add(seen[id(p)])
        seen.setdefault(id(p), name)
    return tied


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder (or a model folder holding one) as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FmkitError(f"no tokenizer.json in {path}; train one with `fmkit tokenizer train` or pass a model folder")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
