"""`fmkit scale plan`: a ladder of pre-training runs (model sizes x token budgets, IsoFLOP-style) sized for this
machine from a measured throughput, written as one recipe per run plus plan.json."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import yaml

from ..config import load_recipe, recipe_dict
from ..errors import FmkitError
from ..workspace import Workspace

# widths x depths for CPU ladders: a 30-minute plan on 2 cores cannot afford the 1m preset's bigger neighbours
CPU_SIZES = ["32x1", "48x2", "64x2", "96x2", "128x3", "192x3", "256x4"]
TOKENS_PER_PARAM = 20   # where each IsoFLOP curve is centred before any fit says otherwise (Hoffmann et al.)


def parse_duration(text: str) -> float:
    """'30m', '2h', '90s', '1h30m' -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text or "")
    if not text or not parts or not any(parts.groups()):
        raise FmkitError(f"--time {text!r} is not a duration; write e.g. 30m, 2h or 1h30m")
    h, m, s = (float(g or 0) for g in parts.groups())
    return h * 3600 + m * 60 + s


def size_overrides(size: str, arch: str) -> tuple[str, dict]:
    """A size name -> (preset, model overrides): a preset name, or WIDTHxDEPTH for a Llama-style grid point."""
    grid = re.fullmatch(r"(\d+)x(\d+)", size)
    if not grid:
        return size, {}
    if arch != "decoder":
        raise FmkitError(f"--sizes {size}: a WIDTHxDEPTH size is for decoders; name {arch} presets instead")
    width, depth = int(grid[1]), int(grid[2])
    heads = max(2, width // 32)
    if width % heads:
        raise FmkitError(f"--sizes {size}: the width must be a multiple of {heads} heads")
    ffn = max(16, round(width * 8 / 3 / 16) * 16)   # SwiGLU's 8/3 ratio, rounded to 16 for the matmuls
    return "tiny", {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads,
                    "num_key_value_heads": heads, "intermediate_size": ffn}


def _config(rec, vocab: int):
    from ..models.build import model_config

    special = {"eos": 0, "pad": 0, "mask": 0, "sentinels": []}   # token ids do not change a model's size
    return model_config(rec.model.arch, rec.model.preset, vocab, rec.train.seq_len, special, rec.model.overrides)


def _shape(config) -> tuple[int, int, int]:
    """(parameters with tied embeddings counted once, layers, width), counted on the meta device: no weights."""
    import torch

    from ..models.build import arch_of, auto_class, count_parameters

    with torch.device("meta"):
        model = auto_class(arch_of(config)).from_config(config)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 1)
    return count_parameters(model), layers, getattr(config, "hidden_size", None) or getattr(config, "d_model", 1)


def probe_flops(config, batch: int, seq_len: int, steps: int = 3) -> float:
    """Training FLOP/s of this model here: a few forward-backward steps on random tokens, the first not timed."""
    import torch

    from ..models.build import build_model
    from ..train.metrics import flops_per_token

    model = build_model(config)
    n, layers, width = _shape(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(steps + 1):
        if i == 1:
            started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tps = batch * seq_len * steps / (time.perf_counter() - started)
    return tps * flops_per_token(n, layers, width, seq_len)


def _ladder(sizes: list[dict], top: float, levels: int, per_level: int, ratio: float) -> list[dict]:
    """Runs at `levels` compute values ending at `top`, each with the `per_level` sizes nearest its 20-tokens-per-
    parameter optimum in log N (the IsoFLOP curve brackets where the minimum is expected)."""
    runs = []
    for k in range(levels):
        c = top / ratio ** (levels - 1 - k)
        centre = math.log(math.sqrt(c / (6 * TOKENS_PER_PARAM)))
        chosen = sorted(sorted(sizes, key=lambda s: abs(math.log(s["N"]) - centre))[:per_level], key=lambda s: s["N"])
        runs += [{**s, "compute": c, "D": c / (6 * s["N"])} for s in chosen]
    return runs


def write_run(folder: Path, size: dict, compute: float, base: str, overrides: dict, workspace: str) -> dict:
    """One run of `size` (a row of the plan's size table) at `compute` FLOPs: its recipe in folder/recipes, its
    output in folder/runs, and its row of plan.json (N, D, steps, compute and predicted seconds)."""
    rec = load_recipe(base or None, overrides)
    rec.model.preset, rec.model.overrides = size["preset"], {**rec.model.overrides, **size["overrides"]}
    tokens_per_step = rec.train.batch_size * rec.train.seq_len * rec.train.grad_accum
    steps = max(1, round(compute / (6 * size["N"]) / tokens_per_step))
    name = f"{size['size']}-c{compute:.2e}".replace("+", "")
    rec.name, rec.out = f"scale-{name}", str(folder / "runs" / name)
    rec.workspace = workspace
    rec.train.steps = steps
    rec.train.warmup_steps = min(rec.train.warmup_steps, max(1, steps // 10))
    rec.train.eval_every = max(1, steps // 4)   # intermediate validation losses for the approach-1 envelope
    rec.train.save_every = max(1, steps // 4)   # a killed run resumes from its last quarter
    rec.train.log_every = max(1, min(rec.train.log_every, steps // 20))
    recipe = folder / "recipes" / f"{name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(recipe_dict(rec), sort_keys=False))
    d = steps * tokens_per_step
    return {"run": name, "recipe": str(recipe), "out": rec.out, "size": size["size"], "N": size["N"], "D": d,
            "steps": steps, "compute": 6 * size["N"] * d, "predicted_s": 6 * size["N"] * d / size["flops_per_s"]}


def scale_plan(shards: str = "", budget: float = 0.0, time_budget: str = "", sizes: list[str] | None = None,
               out: str = "", val_shards: str = "", base: str = "", levels: int = 3, per_level: int = 4,
               ratio: float = 3.0, throughput: float = 0.0, min_steps: int = 20,
               workspace: str | None = None) -> Path:
    """Plan a scaling ladder: model sizes x token budgets (IsoFLOP), written as one recipe per run and plan.json.

    Give the total compute (--budget FLOPs) or wall time (--time 30m, the default when neither is given); the time
    is turned into compute from each size's measured training FLOP/s (a few steps per size), or --throughput.

    Args:
        shards: Training token shards (default: the workspace's shards/stdlib-train, from `fmkit quickstart`).
        budget: Total training compute of the ladder in FLOPs (C = 6ND per run).
        time_budget: Total wall time of the ladder on this machine, e.g. 30m or 2h.
        sizes: Model sizes: preset names (10m, 100m) or WIDTHxDEPTH decoders (64x2); repeat the flag.
        out: Plan folder (default: <workspace>/scale/plan-<timestamp>).
        val_shards: Held-out shards for validation losses (default: the workspace's shards/stdlib-val if present).
        base: A pretrain recipe every run starts from (batch, sequence length, lr, precision, device).
        levels: Compute levels (IsoFLOP curves).
        per_level: Model sizes per compute level.
        ratio: Compute ratio between neighbouring levels.
        throughput: Training FLOP/s to plan with instead of measuring each size.
        min_steps: Fewest optimizer steps a run may have; smaller runs are dropped from the plan.
        workspace: Workspace folder (default: $FMKIT_WORKSPACE or ./fmkit-workspace).
    """
    ws = Workspace(workspace)
    shards = shards or str(ws.path("shards", "stdlib-train"))
    if not (Path(shards) / "index.json").exists():
        raise FmkitError(f"--shards {shards} holds no token shards (index.json); run `fmkit pack` or `fmkit "
                         "quickstart` first")
    if not val_shards and (ws.path("shards", "stdlib-val") / "index.json").exists():
        val_shards = str(ws.path("shards", "stdlib-val"))
    # absolute paths: the recipes are run from wherever `fmkit scale run` is started
    shards, val_shards = str(Path(shards).resolve()), val_shards and str(Path(val_shards).resolve())
    base = str(Path(base).resolve()) if base and Path(base).exists() else base
    if budget and time_budget:
        raise FmkitError("give --budget or --time, not both")
    seconds = parse_duration(time_budget or "30m") if not budget else 0.0
    if levels < 1 or per_level < 1 or ratio <= 1:
        raise FmkitError("--levels and --per-level must be at least 1 and --ratio above 1")
    vocab = json.loads((Path(shards) / "index.json").read_text())["vocab_size"]
    overrides = {"data.shards": shards, "data.val_shards": val_shards}
    names = list(sizes or CPU_SIZES)
    table = []
    for name in names:
        rec = load_recipe(base or None, overrides)
        preset, extra = size_overrides(name, rec.model.arch)
        rec.model.preset, rec.model.overrides = preset, {**rec.model.overrides, **extra}
        config = _config(rec, vocab)
        n, layers, width = _shape(config)
        flops = throughput or probe_flops(config, rec.train.batch_size, rec.train.seq_len)
        table.append({"size": name, "N": n, "layers": layers, "hidden": width, "flops_per_s": flops,
                      "preset": preset, "overrides": extra})

    def cost(top: float) -> float:
        runs = _ladder(table, top, levels, per_level, ratio)
        return sum(r["compute"] / r["flops_per_s"] for r in runs) if seconds else sum(r["compute"] for r in runs)

    lo, hi = 1e6, 1e30
    for _ in range(100):   # bisection in log compute: the cost rises with the top level's compute
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cost(mid) < (seconds or budget) else (lo, mid)
    folder = (Path(out) if out else ws.path("scale", time.strftime("plan-%Y%m%d-%H%M%S"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    planned, dropped = [], []
    for r in _ladder(table, lo, levels, per_level, ratio):
        run = write_run(folder, r, r["compute"], base, overrides, str(Path(ws.root).resolve()))
        if run["steps"] < min_steps:
            dropped.append({"run": run["run"], "steps": run["steps"], "reason": f"under --min-steps {min_steps}"})
            Path(run["recipe"]).unlink()
        else:
            planned.append(run)
    if len({(p["N"], p["D"]) for p in planned}) < 5:
        raise FmkitError(f"the plan has {len(planned)} runs; a fit needs at least 5: raise --budget/--time, add "
                         "--sizes, or lower --min-steps")
    plan = {"kind": "scale-plan", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "shards": shards,
            "val_shards": val_shards, "base": base, "budget_flops": budget or None, "time_s": seconds or None,
            "levels": levels, "per_level": per_level, "ratio": ratio, "sizes": table, "runs": planned,
            "dropped": dropped, "total_compute": sum(p["compute"] for p in planned),
            "predicted_s": sum(p["predicted_s"] for p in planned)}
    (folder / "plan.json").write_text(json.dumps(plan, indent=2))
    return folder
