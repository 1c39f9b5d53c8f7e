"""`fmkit pretrain`: token shards + recipe -> a Hugging Face-format model folder with its lineage."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..config import Recipe, load_recipe, recipe_dict
from ..errors import FmkitError
from ..models.build import OBJECTIVE_FOR_ARCH, arch_of, auto_class, build_model, count_parameters, max_positions, model_config
from ..models.io import load_model, load_tokenizer, load_weights, save_model
from ..tokenize.shards import TokenShards
from ..tokenize.tokenizer import EOS, MASK, PAD, sentinel
from ..workspace import Workspace, default_root, read_manifest
from . import parallel
from .data import PretrainBatches
from .loop import TrainResult, train
from .objectives import OBJECTIVES


def _special_ids(tok) -> dict:
    ids = {"eos": tok.convert_tokens_to_ids(EOS), "pad": tok.convert_tokens_to_ids(PAD),
           "mask": tok.convert_tokens_to_ids(MASK)}
    sentinels = []
    while tok.convert_tokens_to_ids(sentinel(len(sentinels))) not in (None, tok.unk_token_id):
        sentinels.append(tok.convert_tokens_to_ids(sentinel(len(sentinels))))
    ids["sentinels"] = sentinels
    return ids


def prepare(recipe: Recipe):
    """Build what a run needs from a recipe: shards, tokenizer, model, objective and batch sources."""
    if not recipe.data.shards:
        raise FmkitError("data.shards is not set: pass the folder written by `fmkit pack` "
                         "(in the recipe or as --data.shards=PATH)")
    shards = TokenShards(recipe.data.shards)
    tok_dir = Path(recipe.data.shards) / "tokenizer"
    tok = load_tokenizer(tok_dir)
    special = _special_ids(tok)
    cfg = recipe.train
    if recipe.model.init_from:
        model = load_model(recipe.model.init_from).train()
        if model.config.vocab_size < shards.vocab_size:
            raise FmkitError(f"model.init_from {recipe.model.init_from} has vocab {model.config.vocab_size}, "
                             f"smaller than the shards' {shards.vocab_size}; pack with the model's tokenizer")
    else:
        config = model_config(recipe.model.arch, recipe.model.preset, shards.vocab_size, cfg.seq_len, special,
                              recipe.model.overrides)
        model = build_model(config, seed=cfg.seed)
    arch = arch_of(model.config)
    if cfg.seq_len > max_positions(model.config):
        raise FmkitError(f"train.seq_len={cfg.seq_len} is above the model's {max_positions(model.config)} "
                         "positions; lower train.seq_len or raise model.overrides.max_position_embeddings")
    name = OBJECTIVE_FOR_ARCH.get(arch) if cfg.objective == "auto" else cfg.objective
    if name not in OBJECTIVES:
        raise FmkitError(f"unknown train.objective '{cfg.objective}'; choose auto or one of {', '.join(OBJECTIVES)}")
    if name != OBJECTIVE_FOR_ARCH.get(arch):
        raise FmkitError(f"train.objective={name} does not fit a {arch} model; use "
                         f"{OBJECTIVE_FOR_ARCH.get(arch)} (or train.objective=auto)")
    extra = {}
    if name == "masked_lm":
        extra["mask_id"] = special["mask"]
    if name == "span_corruption":
        needed = max(1, round(cfg.seq_len * 0.15 / 3))
        if len(special["sentinels"]) < needed:
            raise FmkitError(f"span corruption of {cfg.seq_len} tokens needs {needed} sentinel tokens but the "
                             f"tokenizer has {len(special['sentinels'])}; retrain it with --sentinels {needed}")
        extra["sentinel_ids"] = special["sentinels"]
    return shards, tok_dir, model, OBJECTIVES[name], extra


def pretrain(recipe: str | Path | None = None, overrides: list[str] | dict | None = None, resume: bool = False,
             workspace: str | Path | None = None, on_log: Callable[[dict], None] | None = None) -> Path:
    """Pre-train (or continue pre-training) a model from token shards, as a recipe says.

    Any recipe key can be overridden, e.g. --train.steps=2000 --train.lr=3e-4 --model.preset=10m
    --data.shards=PATH. Under torchrun it trains with DDP (default) or FSDP2 (--train.parallel=fsdp). Returns the
    saved model folder. `on_log` (Python only) receives each logged record.

    Args:
        recipe: Recipe YAML (sections: data, model, train); without one, the defaults plus overrides.
        overrides: Recipe overrides: --section.key=value (e.g. --train.steps=2000).
        resume: Continue from the newest checkpoint in the output folder, exactly where it stopped.
        workspace: Workspace folder (default: the recipe's, else $FMKIT_WORKSPACE or ./fmkit-workspace).
    """
    rec = load_recipe(recipe, overrides)
    rec.train.check()
    if workspace is not None:
        rec.workspace = str(workspace)
    cfg = rec.train
    shards, tok_dir, model, objective, extra = prepare(rec)
    d = parallel.init(cfg.device)
    ws = Workspace(rec.workspace or None) if d.main else None
    out = Path(rec.out) if rec.out else (Path(rec.workspace) if rec.workspace else default_root()) / "models" / rec.name
    batches = PretrainBatches(shards, cfg.batch_size, cfg.seq_len, cfg.grad_accum, cfg.seed, d.rank, d.world, extra)
    val_batches, bpt = [], shards.bytes_per_token
    if rec.data.val_shards:
        val_shards = TokenShards(rec.data.val_shards)
        bpt = val_shards.bytes_per_token
        val_batches = PretrainBatches(val_shards, cfg.batch_size, cfg.seq_len, 1, cfg.seed, d.rank, d.world,
                                      extra).validation(cfg.eval_batches)
    shards_id = read_manifest(rec.data.shards).get("id", "")
    parent_id = read_manifest(rec.model.init_from).get("id", "") if rec.model.init_from else ""
    run_id = ws.start_run("pretrain", recipe_dict(rec), [shards_id, parent_id]) if ws else ""
    try:
        result = train(model, objective, batches, cfg, out, val_batches=val_batches, resume=resume,
                       bytes_per_token=bpt, run_info={"run_id": run_id}, on_log=on_log, d=d)
    except BaseException as e:
        if ws:
            ws.finish_run(run_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    if d.main:
        _save(model, result, rec, out, tok_dir, shards, shards_id, parent_id, run_id, ws)
    return out


def _save(model, result: TrainResult, rec: Recipe, out: Path, tok_dir: Path, shards: TokenShards,
          shards_id: str, parent_id: str, run_id: str, ws: Workspace) -> None:
    # A fresh unwrapped copy: the trained module may be sharded (FSDP) or compiled; the full state is on rank 0.
    model = auto_class(arch_of(model.config)).from_config(model.config)
    load_weights(model, result.final_state, str(out))
    last = result.history[-1] if result.history else {}
    manifest = {"kind": "model", "arch": arch_of(model.config), "parameters": count_parameters(model),
                "dataset": shards.index.get("source"), "shards": str(Path(rec.data.shards).resolve()),
                "shards_id": shards_id, "parent_model": rec.model.init_from or None, "parent_id": parent_id or None,
                "recipe": recipe_dict(rec), "steps": result.step, "tokens_seen": result.tokens_seen,
                "precision": result.precision, "final_metrics": last, "run_id": run_id,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.pad_token_id
    manifest["id"] = ws.add_artifact("model", out, manifest, parents=[shards_id, parent_id])
    save_model(model, out, tok_dir, manifest)
    ws.finish_run(run_id, "finished", outputs=[manifest["id"]])
