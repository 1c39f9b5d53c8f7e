"""The ladder's results as (run, N, D, loss) points: read from run folders' metrics.jsonl, a plan, or a table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import FmkitError
from ..train.metrics import read_metrics


def run_points(folder: Path, n_params: int | None = None, name: str = "") -> list[dict]:
    """One point per validation (else training) loss a run logged, the last one marked final.

    D is the tokens the loop counted, not the planned number, so a run resumed or trained on another world size
    is still placed where it really is."""
    rows = [r for r in read_metrics(folder) if r.get("tokens_seen")]
    manifest = folder / "fmkit.json"
    if n_params is None and manifest.exists():
        n_params = json.loads(manifest.read_text()).get("parameters")
    if not rows or not n_params:
        return []
    key = "val_loss" if any("val_loss" in r for r in rows) else "loss"
    rows = [r for r in rows if key in r]
    finished = manifest.exists()
    return [{"run": name or folder.name, "N": float(n_params), "D": float(r["tokens_seen"]), "loss": float(r[key]),
             "final": finished and r is rows[-1], "metric": key, "step": r["step"]} for r in rows]


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
                        "loss": float(r["loss"]), "final": final})
        except (KeyError, TypeError, ValueError):
            raise FmkitError(f"{path}: row {i + 1} needs numeric N, D and loss") from None
    return out


def load_points(sources: list[str]) -> list[dict]:
    """Points from plan folders (plan.json), run folders (metrics.jsonl), folders of runs, or JSON/CSV tables."""
    points = []
    for src in sources:
        path = Path(src)
        if path.is_file():
            points += _table(path)
        elif (path / "plan.json").exists():
            plan = json.loads((path / "plan.json").read_text())
            for r in plan["runs"]:
                points += run_points(Path(r["out"]), r["N"], r["run"])
        elif (path / "metrics.jsonl").exists():
            points += run_points(path)
        elif path.is_dir():
            for sub in sorted(p for p in path.iterdir() if (p / "metrics.jsonl").exists()):
                points += run_points(sub)
        else:
            raise FmkitError(f"{src} is not a plan folder, a run folder or a JSON/CSV table of N, D, loss")
    if not any(p["final"] for p in points):
        raise FmkitError(f"no finished runs in {', '.join(sources)}; run them first with `fmkit scale run PLAN`")
    return points
