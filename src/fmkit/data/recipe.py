"""The curation recipe: sources, the pipeline of blocks, dedup, mixing and output; checked before any work starts."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_recipe, unknown_key
from ..errors import FmkitError
from .dedup import MinHashConfig
from .filters import C4Quality, CodeQuality, GopherQuality, GopherRepetition
from .pii import PIIRedact
from .sources import SourceSpec, infer_type
from .toxicity import Toxicity

BLOCKS = {b.name: b for b in (GopherQuality, GopherRepetition, C4Quality, CodeQuality, PIIRedact, Toxicity)}
DEFAULT_PIPELINE = ["gopher_quality", "gopher_repetition", "code", "pii", "toxicity"]


@dataclass
class DedupConfig:
    exact: bool = True          # drop documents whose normalised text is identical to an earlier one
    minhash: bool = True        # drop near-duplicates found by MinHash LSH
    ngram: int = MinHashConfig.ngram    # word n-gram shingles
    bands: int = MinHashConfig.bands
    rows: int = MinHashConfig.rows      # hashes per band; bands * rows permutations
    seed: int = MinHashConfig.seed
    jaccard: float = MinHashConfig.jaccard   # exact Jaccard with the survivor that makes a near-duplicate


@dataclass
class MixConfig:
    weights: dict = field(default_factory=dict)   # domain -> target share of tokens; empty keeps the natural mix
    tokenizer: str = ""         # tokenizer folder/tokenizer.json to count tokens; default: a pre-tokenizer estimate
    seed: int = 0               # which documents a fractional up/down-sampling rate picks


@dataclass
class CurateRecipe:
    name: str = "dataset"
    workspace: str = ""         # default: $FMKIT_WORKSPACE or ./fmkit-workspace
    out: str = ""               # dataset folder; default <workspace>/datasets/<name>
    workers: int = 0            # worker processes; 0: one per CPU core
    executor: str = "local"     # local | ray
    files_per_unit: int = 64    # files per unit of work (the grain of parallelism and resume)
    shard_docs: int = 50_000    # documents per output Parquet shard
    sources: list = field(default_factory=list)
    pipeline: list = field(default_factory=lambda: list(DEFAULT_PIPELINE))
    dedup: DedupConfig = field(default_factory=DedupConfig)
    mix: MixConfig = field(default_factory=MixConfig)


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def _build(cls, params: dict, what: str, where: str):
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise FmkitError(f"{what} in {where} must be a mapping of parameters, got {params!r}")
    known = _fields(cls)
    for k, v in params.items():
        if k not in known:
            raise unknown_key(f"{what}.{k}", where, [f"{what}.{n}" for n in known])
        typ = known[k]
        ok = isinstance(v, typ) or (typ is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok or (typ is int and isinstance(v, bool)):
            raise FmkitError(f"{what}.{k} in {where} must be {typ.__name__}, got {v!r}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise FmkitError(f"{what} in {where}: {e}") from None


def build_blocks(pipeline: list, where: str = "the recipe") -> list:
    """Blocks from recipe entries: a block name, or {name: {param: value}}."""
    blocks = []
    for i, entry in enumerate(pipeline):
        if isinstance(entry, str):
            name, params = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, params), = entry.items()
        else:
            raise FmkitError(f"pipeline step {i + 1} in {where} must be a block name or {{name: {{params}}}}, "
                             f"got {entry!r}")
        if name not in BLOCKS:
            raise unknown_key(f"pipeline.{name}", where, [f"pipeline.{b}" for b in BLOCKS])
        block = _build(BLOCKS[name], params, f"pipeline.{name}", where)
        if block.applies_to not in ("text", "code", "all"):
            raise FmkitError(f"pipeline.{name}.applies_to in {where} must be text, code or all")
        blocks.append(block)
    return blocks


def build_sources(sources: list, where: str = "the recipe") -> list[SourceSpec]:
    if not sources:
        raise FmkitError(f"the recipe {where} names no sources; add e.g. sources: [{{name: docs, path: ./docs}}]")
    specs = []
    for i, entry in enumerate(sources):
        if isinstance(entry, str):
            entry = {"name": Path(entry).name or entry, "path": entry}
        if not isinstance(entry, dict):
            raise FmkitError(f"source {i + 1} in {where} must be a mapping, got {entry!r}")
        entry = dict(entry)
        entry.setdefault("name", f"source{i + 1}")
        if isinstance(entry.get("glob"), str):
            entry["glob"] = [entry["glob"]]
        spec = _build(SourceSpec, entry, f"sources[{i}]", where)
        if not spec.path and not spec.dataset:
            raise FmkitError(f"source '{spec.name}' in {where} needs a path (or dataset: for a Hugging Face id)")
        if spec.kind not in ("text", "code", "auto"):
            raise FmkitError(f"source '{spec.name}' in {where}: kind must be text, code or auto")
        spec.type = infer_type(spec)
        specs.append(spec)
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise FmkitError(f"two sources in {where} are named '{dup}'; names must be unique")
    return specs


def load_curate_recipe(path=None, overrides=None) -> CurateRecipe:
    recipe = load_recipe(path, overrides, cls=CurateRecipe)
    where = str(path) if path else "the command line"
    build_blocks(recipe.pipeline, where)
    build_sources(recipe.sources, where)
    for name in ("ngram", "bands", "rows"):
        if getattr(recipe.dedup, name) < 1:
            raise FmkitError(f"dedup.{name} in {where} must be at least 1, got {getattr(recipe.dedup, name)}")
    if not 0 < recipe.dedup.jaccard <= 1:
        raise FmkitError(f"dedup.jaccard in {where} must be above 0 and at most 1, got {recipe.dedup.jaccard!r}")
    if recipe.executor not in ("local", "ray"):
        raise FmkitError(f"executor '{recipe.executor}' in {where}: use local or ray")
    for dom, w in recipe.mix.weights.items():
        if not isinstance(w, (int, float)) or w < 0:
            raise FmkitError(f"mix.weights.{dom} in {where} must be a number >= 0, got {w!r}")
    return recipe
