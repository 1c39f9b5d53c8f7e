"""The workspace folder and its SQLite registry of runs and artifacts with their lineage.

The registry is an index over self-describing artifact folders (each has an `fmkit.json`), never the only copy of
a fact: deleting registry.db loses the index, not the lineage.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, path TEXT NOT NULL UNIQUE, created REAL NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, started REAL NOT NULL, finished REAL,
    config TEXT NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS lineage (
    child TEXT NOT NULL, parent TEXT NOT NULL, relation TEXT NOT NULL, PRIMARY KEY (child, parent, relation));
"""


def default_root() -> Path:
    return Path(os.environ.get("FMKIT_WORKSPACE", "fmkit-workspace"))


class Workspace:
    """A folder of artifacts (`datasets/`, `tokenizers/`, `shards/`, `models/`) and `registry.db` indexing them."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "registry.db"
        self._db = sqlite3.connect(self.db_path, timeout=30)
        self._db.executescript(SCHEMA)

    def path(self, kind: str, name: str) -> Path:
        """Where an artifact of this kind and name lives by default."""
        return self.root / kind / name

    def add_artifact(self, kind: str, path: str | Path, meta: dict, parents: list[str] = ()) -> str:
        """Record an artifact folder (re-recording the same path keeps its id) and its parents; returns its id."""
        path = str(Path(path).resolve())
        row = self._db.execute("SELECT id FROM artifacts WHERE path = ?", (path,)).fetchone()
        art_id = row[0] if row else f"{kind}-{uuid.uuid4().hex[:10]}"
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)",
                             (art_id, kind, path, time.time(), json.dumps(meta)))
            for parent in parents:
                if parent:
                    self._db.execute("INSERT OR IGNORE INTO lineage VALUES (?, ?, 'derived_from')", (art_id, parent))
        return art_id

    def start_run(self, kind: str, config: dict, inputs: list[str] = ()) -> str:
        run_id = f"run-{kind}-{uuid.uuid4().hex[:10]}"
        with self._db:
            self._db.execute("INSERT INTO runs VALUES (?, ?, 'running', ?, NULL, ?, NULL)",
                             (run_id, kind, time.time(), json.dumps(config, default=str)))
            for art in inputs:
                if art:
                    self._db.execute("INSERT OR IGNORE INTO lineage VALUES (?, ?, 'input')", (run_id, art))
        return run_id

    def finish_run(self, run_id: str, status: str = "finished", outputs: list[str] = (), error: str = "") -> None:
        with self._db:
            self._db.execute("UPDATE runs SET status = ?, finished = ?, error = ? WHERE id = ?",
                             (status, time.time(), error or None, run_id))
            for art in outputs:
                self._db.execute("INSERT OR IGNORE INTO lineage VALUES (?, ?, 'output')", (art, run_id))

    def artifacts(self, kind: str | None = None) -> list[dict]:
        q = "SELECT id, kind, path, created, meta FROM artifacts"
        rows = self._db.execute(q + (" WHERE kind = ?" if kind else "") + " ORDER BY created",
                                (kind,) if kind else ()).fetchall()
        return [dict(id=r[0], kind=r[1], path=r[2], created=r[3], meta=json.loads(r[4])) for r in rows]

    def runs(self) -> list[dict]:
        rows = self._db.execute("SELECT id, kind, status, started, finished, error FROM runs ORDER BY started")
        return [dict(zip(("id", "kind", "status", "started", "finished", "error"), r)) for r in rows]

    def lineage(self, art_id: str) -> list[str]:
        """Every ancestor of an artifact, nearest first (through the runs that produced it)."""
        seen, frontier = [], [art_id]
        while frontier:
            nxt = []
            for node in frontier:
                for (parent,) in self._db.execute("SELECT parent FROM lineage WHERE child = ?", (node,)):
                    if parent not in seen:
                        seen.append(parent)
                        nxt.append(parent)
            frontier = nxt
        return seen

    def close(self) -> None:
        self._db.close()


def locate(ref: str | Path, kind: str, workspace: str | Path | None = None) -> Path:
    """`ref` as a path; or, when nothing is there and it is a bare name, the artifact of that name in the
    workspace's `kind/` folder (`fmkit eval report my-run` finds <workspace>/evals/my-run)."""
    path = Path(ref).expanduser()
    if path.exists() or len(path.parts) != 1 or ":" in str(ref):
        return path
    named = (Path(workspace) if workspace else default_root()) / kind / str(ref)
    return named if named.exists() else path


def registry(kind: str | None = None, workspace: str | Path | None = None) -> dict:
    """List the workspace's artifacts and runs with their lineage.

    Args:
        kind: Only artifacts of this kind (dataset, tokenizer, shards, model, adapter, rag-index, eval).
        workspace: Workspace folder (default $FMKIT_WORKSPACE or ./fmkit-workspace).

    Returns {registry: the database file, artifacts: [{id, kind, path, parents, meta}], runs: [{id, kind, status,
    error, ...}]}.
    """
    ws = Workspace(workspace)
    try:
        arts = [{**a, "parents": ws.lineage(a["id"])} for a in ws.artifacts(kind)]
        return {"registry": str(ws.db_path), "artifacts": arts, "runs": ws.runs()}
    finally:
        ws.close()


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Write `fmkit.json`, the self-description every artifact folder carries."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "fmkit.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(folder / "fmkit.json")


def read_manifest(folder: str | Path) -> dict:
    p = Path(folder) / "fmkit.json"
    return json.loads(p.read_text()) if p.is_file() else {}
