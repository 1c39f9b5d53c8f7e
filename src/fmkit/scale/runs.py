"""The ladder's results as (run, N, D, loss) points: read from run folders' metrics.jsonl, a plan, or a table."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from ..errors import FmkitError
from ..train.metrics import read_metrics
from ..workspace import Workspace


def run_points(folder: Path, n_params: int | None = None, name: str = "") -> list[dict]:
    """One point per validation (else training) loss a run logged, the last one marked final.

    D is the tokens the loop counted, not the planned number, so a run resumed or trained on another world size
    is still placed where it really is; `unique` is the tokens in the shards it trained on."""
    rows = [r for r in read_metrics(folder) if r.get("tokens_seen")]
    manifest = folder / "fmkit.json"
    meta = json.loads(manifest.read_text()) if manifest.exists() else {}
    n_params = n_params or meta.get("parameters")
    unique = unique_tokens(meta.get("shards"))
    if not rows or not n_params:
        return []
    key = "val_loss" if any("val_loss" in r for r in rows) else "loss"
    rows = [r for r in rows if key in r]
    finished = manifest.exists()
    return [{"run": name or folder.name, "N": float(n_params), "D": float(r["tokens_seen"]), "loss": float(r[key]),
             "final": finished and r is rows[-1], "metric": key, "step": r["step"], "unique": unique} for r in rows]


def unique_tokens(shards: str | None) -> float | None:
    """The tokens in a shard folder (index.json), which a run passing over it more than once sees again."""
    index = Path(shards) / "index.json" if shards else None
    if index is None or not index.exists():
        return None
    return float(json.loads(index.read_text())["tokens"])


def _table(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        data = json.loads(path.read_text())
        rows = data.get("points", data.get("runs", [])) if isinstance(data, dict) else data
    out = []
    for i, r in enumerate(rows):
        try:
            final = str(r.get("final", True)).lower() not in ("0", "false", "no")
            out.append({"run": str(r.get("run", i)), "N": float(r["N"]), "D": float(r["D"]),
                        "loss": float(r["loss"]), "final": final,
                        "unique": float(r["unique"]) if r.get("unique") not in (None, "") else None})
        except (KeyError, TypeError, ValueError):
            raise FmkitError(f"{path}: row {i + 1} needs numeric N, D and loss") from None
    return out


def run_folders(sources: list[str]) -> list[tuple[str, Path, int | None]]:
    """(run name, folder, parameters if the plan says) for each run in plan folders, run folders (metrics.jsonl)
    or folders of runs; tables are skipped."""
    out = []
    for src in sources:
        path = Path(src)
        if path.is_file():
            continue
        if (path / "plan.json").exists():
            out += [(r["run"], Path(r["out"]), r["N"]) for r in json.loads((path / "plan.json").read_text())["runs"]]
        elif (path / "metrics.jsonl").exists():
            out.append((path.name, path, None))
        elif path.is_dir():
            out += [(p.name, p, None) for p in sorted(path.iterdir()) if (p / "metrics.jsonl").exists()]
        else:
            raise FmkitError(f"{src} is not a plan folder, a run folder or a JSON/CSV table of N, D, loss")
    return out


def output_folder(runs: list[str], out: str, kind: str, workspace: str | None) -> Path:
    """Where a verb over `runs` writes: `out`, else the first source when it is a plan folder, else
    <workspace>/scale/KIND-<time>; created."""
    first = Path(runs[0])
    folder = Path(out) if out else first if (first / "plan.json").exists() else \
        Workspace(workspace).path("scale", time.strftime(f"{kind}-%Y%m%d-%H%M%S"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_points(sources: list[str]) -> list[dict]:
    """Points from plan folders (plan.json), run folders (metrics.jsonl), folders of runs, or JSON/CSV tables
    (columns N, D, loss, and optionally run, final, unique)."""
    points = [p for src in sources if Path(src).is_file() for p in _table(Path(src))]
    for name, folder, n in run_folders(sources):
        points += run_points(folder, n, name)
    if not any(p["final"] for p in points):
        raise FmkitError(f"no finished runs in {', '.join(sources)}; run them first with `fmkit scale run PLAN`")
    return points
