"""Model references: the one place where a string a user typed becomes a model.

A reference is
- a model folder: fmkit's, or any transformers folder on disk (`config.json` + weights);
- a PEFT adapter folder (`adapter_config.json`): its base comes from `base=`, else the adapter's `fmkit.json`
  (`parent_model`), else `adapter_config.json` (`base_model_name_or_path`); loaded merged into the base in memory
  (fast, a plain model) or unmerged (the adapter switchable on and off without training);
- `openai:NAME` or `anthropic:NAME`: a hosted or OpenAI-compatible model, reached through `fmkit.providers`;
- `hf:ORG/NAME`: a Hugging Face hub id, loaded by transformers (this needs the network, or the hub cache).

`resolve` only looks at folders and strings; nothing is loaded until `load`/`tokenizer` is called.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FmkitError
from ..workspace import locate, read_manifest

REMOTE = ("openai", "anthropic")
FORMS = "a model folder, an adapter folder, openai:NAME, anthropic:NAME or hf:ORG/NAME"


@dataclass(frozen=True)
class ModelRef:
    """What a reference names. kind: folder | adapter | hf | openai | anthropic."""

    spec: str
    kind: str
    path: Path | None = None          # the model or adapter folder
    name: str = ""                    # remote model name or hub id
    base: "ModelRef | None" = None    # an adapter's base model

    @property
    def local(self) -> bool:
        """Whether the weights are loaded into this process (not behind an HTTP API)."""
        return self.kind not in REMOTE

    @property
    def label(self) -> str:
        """A short name for output folders and result tables."""
        if self.path is not None:
            return self.path.resolve().name
        return f"{self.kind}:{self.name}" if self.kind in REMOTE else self.name.replace("/", "--")

    def manifest(self) -> dict:
        """The reference's own `fmkit.json` (an adapter's, not its base's); {} when it has none."""
        return read_manifest(self.path) if self.path is not None else {}

    @property
    def built_by_fmkit(self) -> bool:
        """Whether fmkit wrote this model (or an adapter's base): such a model may get fmkit's chat template."""
        return bool(self.manifest()) or (self.base is not None and self.base.built_by_fmkit)

    def _need_local(self, what: str) -> None:
        if not self.local:
            raise FmkitError(f"{self.spec} is served over HTTP; {what} needs a local model (a model or adapter "
                             "folder, or hf:ORG/NAME)")

    def config(self):
        """The transformers config of the model (an adapter's base's)."""
        from .io import load_config

        self._need_local("reading its config")
        if self.kind == "adapter":
            return self.base.config()
        if self.kind == "hf":
            from transformers import AutoConfig

            return _from_hub(self.name, lambda: AutoConfig.from_pretrained(self.name))
        return load_config(self.path)

    def load(self, trust_pickle: bool = False, merge: bool = True, device: str = "cpu"):
        """The model in eval mode. An adapter is merged into its base unless `merge=False` (a PEFT model)."""
        from .io import load_model

        self._need_local("loading weights")
        if self.kind == "folder":
            return load_model(self.path, trust_pickle=trust_pickle, device=device)
        if self.kind == "hf":
            return _from_hub(self.name, lambda: _hub_model(self.name, trust_pickle)).to(device).eval()
        try:
            from peft import PeftModel
        except ImportError:
            raise FmkitError(f"{self.spec} is a LoRA adapter, which needs peft: pip install 'fmkit[adapt]'") from None
        net = PeftModel.from_pretrained(self.base.load(trust_pickle, device=device), str(self.path))
        return (net.merge_and_unload() if merge else net).eval()

    def tokenizer(self):
        """The tokenizer saved with the model (an adapter's own when it has one, else its base's)."""
        from .io import load_tokenizer

        self._need_local("a tokenizer")
        if self.kind == "hf":
            from transformers import AutoTokenizer

            return _from_hub(self.name, lambda: AutoTokenizer.from_pretrained(self.name))
        if self.kind == "adapter" and not (self.path / "tokenizer.json").is_file():
            return self.base.tokenizer()
        try:
            return load_tokenizer(self.path)
        except FmkitError:
            raise FmkitError(f"{self.path} has no tokenizer files; copy the tokenizer it was trained with into the "
                             "folder (tokenizer.json, tokenizer_config.json)") from None

    def lineage(self) -> dict:
        """Where the model came from, for results and manifests: its id and its training data, through adapters."""
        own = self.manifest()
        base = self.base.lineage() if self.base is not None else {}
        keys = ("dataset", "dataset_id", "shards", "shards_id", "steps", "tokens_seen")
        out = {k: own[k] for k in keys if k in own} or {k: base[k] for k in keys if k in base}
        if "lineage" in own:   # fine-tuned models carry their base's data lineage
            out = {**own["lineage"], **out}
        if own.get("parent_model"):
            out["parent"] = own["parent_model"]
        if self.base is not None:
            out["base"] = self.base.spec
        return out


def resolve(ref: "str | Path | ModelRef", base: "str | Path | ModelRef | None" = None,
            workspace: str | Path | None = None) -> ModelRef:
    """Turn a reference into a ModelRef, checking that it names something; `base` overrides an adapter's base.
    A bare name that is not a folder here is looked up in the workspace's models/ (`quickstart`)."""
    if isinstance(ref, ModelRef):
        return ref
    spec = str(ref)
    path = locate(spec, "models", workspace)
    if not path.exists():
        prefix, sep, name = spec.partition(":")
        if sep and prefix in REMOTE + ("hf",):
            if not name:
                raise FmkitError(f"model reference {spec} names no model after '{prefix}:'")
            if prefix == "hf" and name.count("/") > 1:
                raise FmkitError(f"{spec} is not a hub id: use hf:ORG/NAME (or hf:NAME)")
            return ModelRef(spec, prefix, name=name)
        if sep and len(prefix) > 1:
            raise FmkitError(f"model reference {spec}: unknown prefix '{prefix}:'; give {FORMS}")
        raise FmkitError(f"model reference {spec}: no such folder (nor a model of that name in the workspace), "
                         "and not openai:NAME, anthropic:NAME or hf:ORG/NAME")
    if not path.is_dir():
        raise FmkitError(f"model reference {spec} is a file; give {FORMS}")
    if (path / "adapter_config.json").is_file():
        return ModelRef(spec, "adapter", path=path, base=resolve(base or _adapter_base(path), None, workspace))
    if (path / "config.json").is_file():
        if base is not None:
            raise FmkitError(f"--base applies to adapters only, and {spec} is a whole model folder")
        return ModelRef(spec, "folder", path=path)
    raise FmkitError(f"{spec} is neither a model folder (no config.json) nor an adapter folder (no "
                     "adapter_config.json)")


def _adapter_base(adapter: Path) -> str:
    """The base an adapter names: fmkit.json's parent_model first (an absolute path), else PEFT's own record."""
    named = read_manifest(adapter).get("parent_model")
    if not named:
        try:
            named = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            raise FmkitError(f"{adapter / 'adapter_config.json'} is not valid JSON") from None
    if not named:
        raise FmkitError(f"adapter {adapter} does not say which model it was trained on; pass --base MODEL")
    if Path(named).exists() or named.startswith(("hf:",) + tuple(f"{p}:" for p in REMOTE)):
        return named
    if named.startswith(("/", ".", "~")) or named.count("/") != 1:
        raise FmkitError(f"adapter {adapter} was trained on {named}, which is not there any more; pass --base "
                         "MODEL (the base model folder or hub id)")
    return f"hf:{named}"   # PEFT records hub ids as ORG/NAME


def _hub_model(name: str, trust_pickle: bool):
    from transformers import AutoConfig

    from .build import arch_of, auto_class

    config = AutoConfig.from_pretrained(name)
    return auto_class(arch_of(config)).from_pretrained(name, use_safetensors=not trust_pickle,
                                                       attn_implementation="sdpa")


def _from_hub(name: str, load):
    """Run a transformers hub load; a failure (offline, unknown id, gated) becomes one sentence."""
    try:
        return load()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FmkitError(f"hf:{name} could not be loaded from the Hugging Face hub, which needs the network unless "
                         f"the model is in the local hub cache ({first[:200]})") from None
