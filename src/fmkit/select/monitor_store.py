"""The monitor's SQLite file (<workspace>/monitor/monitor.db): each monitor's settings and canaries, every run's
outputs, log-probabilities and test results, and the alerts sent.

A run is written in one transaction with its number taken inside it, so two runs started at once (an overlapping
cron job) get different numbers and a run that fails half-way leaves nothing behind.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from ..errors import FmkitError

SCHEMA = """
CREATE TABLE IF NOT EXISTS monitors (
    name TEXT PRIMARY KEY, settings TEXT NOT NULL, canaries TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    monitor TEXT NOT NULL, number INTEGER NOT NULL, started REAL NOT NULL, seconds REAL NOT NULL,
    baseline INTEGER NOT NULL, meta TEXT NOT NULL, summary TEXT NOT NULL, tests TEXT NOT NULL,
    alert INTEGER NOT NULL, PRIMARY KEY (monitor, number));
CREATE TABLE IF NOT EXISTS outputs (
    monitor TEXT NOT NULL, number INTEGER NOT NULL, canary INTEGER NOT NULL, sample INTEGER NOT NULL,
    text TEXT NOT NULL, finish TEXT NOT NULL, score REAL, refused INTEGER NOT NULL,
    PRIMARY KEY (monitor, number, canary, sample));
CREATE TABLE IF NOT EXISTS logprobs (
    monitor TEXT NOT NULL, number INTEGER NOT NULL, canary INTEGER NOT NULL, features TEXT NOT NULL,
    PRIMARY KEY (monitor, number, canary));
CREATE TABLE IF NOT EXISTS alerts (
    monitor TEXT NOT NULL, number INTEGER NOT NULL, at REAL NOT NULL, alert TEXT NOT NULL, delivered TEXT NOT NULL);
"""


class MonitorStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ---- monitors -------------------------------------------------------------------------------------------------
    def create(self, name: str, settings: dict, canaries: list[dict], replace: bool = False) -> bool:
        """Add a monitor; False when one of that name exists and `replace` is not set (its runs then stay)."""
        with self._write():
            if self.monitor(name) is not None:
                if not replace:
                    return False
                for table in ("monitors", "runs", "outputs", "logprobs", "alerts"):
                    self.db.execute(f"DELETE FROM {table} WHERE {'name' if table == 'monitors' else 'monitor'} = ?",
                                    (name,))
            self.db.execute("INSERT INTO monitors VALUES (?, ?, ?, ?)",
                            (name, json.dumps(settings), json.dumps(canaries), time.time()))
        return True

    def monitor(self, name: str) -> tuple[dict, list[dict]] | None:
        row = self.db.execute("SELECT settings, canaries FROM monitors WHERE name = ?", (name,)).fetchone()
        return (json.loads(row[0]), json.loads(row[1])) if row else None

    def names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM monitors ORDER BY name")]

    # ---- runs -----------------------------------------------------------------------------------------------------
    def next_number(self, name: str) -> int:
        row = self.db.execute("SELECT MAX(number) FROM runs WHERE monitor = ?", (name,)).fetchone()
        return (row[0] or 0) + 1

    def add_run(self, name: str, run: dict, outputs: list[tuple], logprobs: dict[int, dict]) -> int:
        """Store a run (number, started, seconds, baseline, meta, summary, tests, alert), its outputs (canary,
        sample, text, finish, score, refused) and log-probabilities {canary: {token: value}}; returns its number."""
        with self._write():
            number = self.next_number(name)
            if number != run["number"]:   # another run got in first: this one's tests were against other runs
                raise FmkitError(f"run {run['number']} of monitor {name} was stored by another process meanwhile; "
                                 "run it again")
            self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (name, number, run["started"], run["seconds"], int(run["baseline"]),
                             json.dumps(run["meta"]), json.dumps(run["summary"]), json.dumps(run["tests"]),
                             int(run["alert"])))
            self.db.executemany("INSERT INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                [(name, number, *o) for o in outputs])
            self.db.executemany("INSERT INTO logprobs VALUES (?, ?, ?, ?)",
                                [(name, number, c, json.dumps(f)) for c, f in logprobs.items()])
        return number

    def runs(self, name: str) -> list[dict]:
        rows = self.db.execute("SELECT number, started, seconds, baseline, meta, summary, tests, alert FROM runs "
                               "WHERE monitor = ? ORDER BY number", (name,)).fetchall()
        return [{"number": n, "started": s, "seconds": sec, "baseline": bool(b), "meta": json.loads(m),
                 "summary": json.loads(su), "tests": json.loads(t), "alert": bool(a)}
                for n, s, sec, b, m, su, t, a in rows]

    def outputs(self, name: str, numbers: list[int]) -> dict[int, dict[int, list[tuple]]]:
        """{run: {canary: [(sample, text, score, refused), ...]}} for the given runs."""
        out: dict = {n: {} for n in numbers}
        marks = ",".join("?" * len(numbers))
        for n, c, s, text, score, refused in self.db.execute(
                f"SELECT number, canary, sample, text, score, refused FROM outputs WHERE monitor = ? AND number IN "
                f"({marks}) ORDER BY number, canary, sample", (name, *numbers)):
            out[n].setdefault(c, []).append((s, text, score, bool(refused)))
        return out

    def logprobs(self, name: str, numbers: list[int]) -> dict[int, dict[int, dict]]:
        """{run: {canary: {token: log-probability}}} for the given runs."""
        out: dict = {n: {} for n in numbers}
        marks = ",".join("?" * len(numbers))
        for n, c, f in self.db.execute(f"SELECT number, canary, features FROM logprobs WHERE monitor = ? AND number "
                                       f"IN ({marks})", (name, *numbers)):
            out[n][c] = json.loads(f)
        return out

    # ---- alerts ---------------------------------------------------------------------------------------------------
    def add_alert(self, name: str, number: int, alert: dict, delivered: dict) -> None:
        with self._write():
            self.db.execute("INSERT INTO alerts VALUES (?, ?, ?, ?, ?)",
                            (name, number, time.time(), json.dumps(alert), json.dumps(delivered)))

    def alerts(self, name: str) -> list[dict]:
        rows = self.db.execute("SELECT number, at, alert, delivered FROM alerts WHERE monitor = ? ORDER BY number",
                               (name,)).fetchall()
        return [{"run": n, "at": at, **json.loads(a), "delivered": json.loads(d)} for n, at, a, d in rows]

    def _write(self):
        return _Transaction(self.db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): the write lock is taken at the start, not at the first
    write, so reading the next run number and inserting the run cannot interleave with another writer."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, *rest):
        self.db.execute("ROLLBACK" if kind else "COMMIT")
