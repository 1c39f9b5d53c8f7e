"""The candidates file: which models to compare, each with its generation settings, prompt and price.

```yaml
defaults: {max_tokens: 64}            # any candidate field, for every candidate
judge: {model: openai:gpt-4o-mini}    # for suite rows with a rubric (model, base_url, api_key_env)
candidates:
  - name: hosted
    model: openai:gpt-4o-mini         # any model reference: folder, adapter, openai:NAME, anthropic:NAME, hf:...
    system: Answer in one word.
    price: [0.15, 0.60]               # USD per million input / output tokens (default: the price table)
  - name: tuned
    model: ./models/my-ft
    prompt: "Question: {{input}}\nAnswer:"   # Jinja over the row's input and vars
```
Errors name the file and line of the field to fix.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import FmkitError
from ..providers import GenRequest, Model, get_model


@dataclass
class Candidate:
    name: str = ""
    model: str = ""
    base: str = ""                 # an adapter's base model, where the adapter does not name it
    base_url: str = ""             # OpenAI-compatible server for openai:NAME
    api_key_env: str = ""          # environment variable holding the API key (keys stay out of the file)
    system: str = ""
    prompt: str = ""               # Jinja template over {{input}} and the row's vars
    chat: bool | None = None       # send chat messages (default: hosted models, and local ones with a template)
    temperature: float = 0.0
    max_tokens: int = 256
    stop: list = field(default_factory=list)
    seed: int = 0
    price: list | None = None      # [input, output] USD per million tokens
    timeout_s: float = 120.0
    concurrency: int = 4
    dtype: str = "fp32"
    line: int = 0                  # where the candidate is declared

    def fingerprint(self) -> str:
        """A hash of everything that decides the answers (not the name, price or concurrency), so that a
        resumed run reuses an answer only when the same model was asked the same way."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("name", "price", "timeout_s", "concurrency",
                                                                    "line")}
        weights = Path(self.model).expanduser()
        if weights.is_dir():   # a model retrained in place is a different model
            keep["weights"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                                     for p in weights.glob("*.safetensors"))
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Candidates:
    source: str
    candidates: list
    judge: dict


class _LineLoader(yaml.SafeLoader):
    """Safe YAML whose mappings remember the line of each key (for file:line errors)."""


class _Map(dict):
    line = 0
    lines: dict = {}


def _mapping(loader, node):
    out = _Map(loader.construct_mapping(node, deep=True))
    out.line = node.start_mark.line + 1
    out.lines = {loader.construct_object(k, deep=True): k.start_mark.line + 1 for k, _ in node.value}
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

FIELDS = [f.name for f in fields(Candidate) if f.name != "line"]
TYPES = {"temperature": (int, float), "max_tokens": int, "seed": int, "timeout_s": (int, float),
         "concurrency": int, "stop": list, "price": list, "chat": bool}


def _check(spec: dict, where: str) -> dict:
    for k, v in spec.items():
        at = f"{where.split(':')[0]}:{getattr(spec, 'lines', {}).get(k, getattr(spec, 'line', 0))}"
        if k not in FIELDS:
            near = difflib.get_close_matches(str(k), FIELDS, n=1, cutoff=0.5)
            raise FmkitError(f"{at}: unknown candidate field '{k}'" + (f"; did you mean '{near[0]}'?" if near
                                                                        else f" (fields: {', '.join(FIELDS)})"))
        want = TYPES.get(k, str)
        if v is not None and (not isinstance(v, want) or (want is int and isinstance(v, bool))):
            raise FmkitError(f"{at}: candidate field '{k}' must be {getattr(want, '__name__', 'a number')}, "
                             f"got {v!r}")
        if k == "price" and (len(v) != 2 or not all(isinstance(x, (int, float)) for x in v)):
            raise FmkitError(f"{at}: price must be [input, output] in USD per million tokens, got {v!r}")
    return spec


def load_candidates(path: str | Path) -> Candidates:
    """Read and check a candidates YAML file; every mistake names its file:line."""
    p = Path(path)
    if not p.is_file():
        raise FmkitError(f"candidates file {p} not found")
    try:
        doc = yaml.load(p.read_text(), Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise FmkitError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") \
            from None
    if not isinstance(doc, dict) or not isinstance(doc.get("candidates"), list) or not doc["candidates"]:
        raise FmkitError(f"{p}: expected a mapping with a non-empty 'candidates:' list")
    for k in doc:
        if k not in ("candidates", "defaults", "judge"):
            raise FmkitError(f"{p}:{doc.lines.get(k, 1)}: unknown top-level key '{k}' (known: candidates, "
                             "defaults, judge)")
    defaults = _check(doc.get("defaults") or _Map(), f"{p}:{doc.lines.get('defaults', 1)}")
    out, names = [], set()
    for spec in doc["candidates"]:
        if not isinstance(spec, dict):
            raise FmkitError(f"{p}:{doc.lines.get('candidates', 1)}: each candidate must be a mapping with model:")
        _check(spec, f"{p}:{spec.line}")
        c = Candidate(**{**defaults, **spec}, line=spec.line)
        if not c.model:
            raise FmkitError(f"{p}:{spec.line}: candidate has no 'model:' (a model reference)")
        c.model = _relative(c.model, p.parent)
        c.name = c.name or c.model.rstrip("/").split("/")[-1]
        if c.name in names:
            raise FmkitError(f"{p}:{spec.line}: two candidates are named '{c.name}'; give one a name:")
        names.add(c.name)
        out.append(c)
    judge = doc.get("judge") or {}
    if judge and (not isinstance(judge, dict) or not judge.get("model")
                  or set(judge) - {"model", "base_url", "api_key_env"}):
        raise FmkitError(f"{p}:{doc.lines.get('judge', 1)}: judge must be a mapping with model: (and optionally "
                         "base_url:, api_key_env:)")
    return Candidates(str(p), out, dict(judge))


def _relative(ref: str, base: Path) -> str:
    """A folder reference as typed when it exists from here, else relative to the candidates file."""
    if ":" in ref.split("/")[0] or Path(ref).expanduser().exists():
        return ref
    beside = base / ref
    return str(beside) if beside.exists() else ref


def open_model(c: Candidate, workspace=None, cache=None, prices=None, concurrency: int = 1) -> Model:
    """The candidate's model. Hosted ones get `concurrency` requests in flight (1 when each worker has its own
    instance, so that its usage counts one request at a time), the eval stage's retries and the response cache."""
    from ..models.reference import resolve

    ref = resolve(c.model, c.base or None, workspace)
    if ref.local:
        return get_model(ref, batch_size=1, dtype=c.dtype)
    key = os.environ.get(c.api_key_env, "") if c.api_key_env else ""
    if c.api_key_env and not key:
        raise FmkitError(f"candidate '{c.name}': environment variable {c.api_key_env} is not set")
    m = get_model(ref, base_url=c.base_url, api_key=key, cache=cache, concurrency=concurrency, prices=prices,
                  timeout=c.timeout_s)
    if c.price is not None:
        m.price = tuple(map(float, c.price))
    return m


def open_judge(spec: dict, cache=None) -> Model:
    key = os.environ.get(spec.get("api_key_env", ""), "") if spec.get("api_key_env") else ""
    return get_model(str(spec["model"]), base_url=spec.get("base_url", ""), api_key=key, cache=cache)


def uses_chat(c: Candidate, model: Model) -> bool:
    if c.chat is not None:
        return c.chat
    tok = getattr(model, "tok", None)
    return bool(getattr(tok, "chat_template", None)) if tok is not None else "chat" in model.capabilities


def request(c: Candidate, chat: bool, text, variables: dict, where: str) -> GenRequest:
    """What the candidate is sent for one suite row: its template over the input, its system prompt, settings."""
    if c.prompt and isinstance(text, str):
        from jinja2 import Environment, StrictUndefined

        try:
            text = Environment(undefined=StrictUndefined).from_string(c.prompt).render(input=text, **variables)
        except Exception as e:
            raise FmkitError(f"candidate '{c.name}': its prompt template fails on {where} ({e})") from None
    if chat:
        messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
        prompt = ([{"role": "system", "content": c.system}] if c.system else []) + messages
    elif isinstance(text, list):
        raise FmkitError(f"{where}: the input is chat messages, but candidate '{c.name}' sends plain prompts "
                         "(set chat: true)")
    else:
        prompt = (c.system + "\n\n" if c.system else "") + text
    return GenRequest(prompt, list(c.stop), int(c.max_tokens), float(c.temperature), seed=int(c.seed))
