"""The platform's records: uploaded files, fine-tuning jobs, their events and checkpoints, in one SQLite file.

`<workspace>/platform/` holds `platform.db`, `files/<id>` (each upload as it came) and `jobs/<id>/` (what a job
trains). The server and the job workers write the same database (WAL, so readers never wait for a writer), which
is what makes the queue persistent: a job's row says where it is, whichever process dies.

Every row has an owner, the name of the API key that made it; every query for a tenant filters on it, so another
key's id reads as if it did not exist.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at INTEGER NOT NULL, model TEXT NOT NULL, base TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, method TEXT NOT NULL, suffix TEXT, seed INTEGER NOT NULL,
    metadata TEXT, full INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL, error TEXT, fine_tuned_model TEXT,
    finished_at INTEGER, trained_tokens INTEGER, estimated_finish INTEGER, result_files TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0, pid INTEGER, want TEXT, plan TEXT);
CREATE TABLE IF NOT EXISTS events (
    n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL,
    metrics TEXT NOT NULL, model TEXT NOT NULL UNIQUE, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deleted (model TEXT PRIMARY KEY, deleted_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job, n);
"""

JSON_COLUMNS = {"method", "metadata", "error", "result_files", "plan", "metrics", "data"}


def _encode(values: dict) -> dict:
    """Column values as SQLite stores them: the JSON columns as text."""
    return {k: json.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in values.items()}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files_dir, self.jobs_dir = self.root / "files", self.root / "jobs"
        for d in (self.files_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "platform.db"
        self.local = threading.local()   # one connection per thread: sqlite3 connections are not shared
        with self.db:
            self.db.executescript(SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        con = getattr(self.local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=30000")
            self.local.con = con
        return con

    # ---- rows -------------------------------------------------------------------------------------------------
    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict | None:
        if row is None:
            return None
        out = dict(row)
        for k in JSON_COLUMNS & out.keys():
            out[k] = json.loads(out[k]) if out[k] is not None else None
        return out

    def insert(self, table: str, **values) -> dict:
        values = _encode(values)
        self.db.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                        tuple(values.values()))
        return self.get(table, values["id"])

    def update(self, table: str, id_: str, where_status: tuple = (), **values) -> bool:
        """Set fields of one row; with `where_status`, only while its status is one of them (so a cancel and a
        finishing worker cannot both win). True if the row changed."""
        values = _encode(values)
        sql = f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
        args = (*values.values(), id_)
        if where_status:
            sql += f" AND status IN ({', '.join('?' * len(where_status))})"
            args += tuple(where_status)
        return self.db.execute(sql, args).rowcount > 0

    def get(self, table: str, id_: str, owner: str | None = None) -> dict | None:
        """The row, or None when there is none or it belongs to another owner (owner None: any)."""
        row = self._row(self.db.execute(f"SELECT * FROM {table} WHERE id = ?", (id_,)).fetchone())
        if row is not None and owner is not None and self.owner_of(table, row) != owner:
            return None
        return row

    def owner_of(self, table: str, row: dict) -> str:
        if "owner" in row:
            return row["owner"]
        job = self.db.execute("SELECT owner FROM jobs WHERE id = ?", (row["job"],)).fetchone()
        return job[0] if job else ""

    def page(self, table: str, owner: str | None, after: str | None, limit: int, ascending: bool = False,
             where: dict | None = None) -> tuple[list[dict], bool]:
        """One page of rows in creation order (newest first unless `ascending`), starting after the row `after`:
        (rows, whether more follow). An `after` this owner cannot see starts from the beginning, as OpenAI does."""
        clauses, args = [], []
        for k, v in (where or {}).items():
            clauses.append(f"{k} = ?")
            args.append(v)
        if owner is not None and table in ("files", "jobs"):
            clauses.append("owner = ?")
            args.append(owner)
        order = "rowid" if table != "events" else "n"
        if after:
            anchor = self.db.execute(f"SELECT {order} FROM {table} WHERE id = ?", (after,)).fetchone()
            if anchor is not None:
                clauses.append(f"{order} {'>' if ascending else '<'} ?")
                args.append(anchor[0])
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        sql += f" ORDER BY {order} {'ASC' if ascending else 'DESC'} LIMIT ?"
        rows = [self._row(r) for r in self.db.execute(sql, (*args, limit + 1)).fetchall()]
        return rows[:limit], len(rows) > limit

    def delete(self, table: str, id_: str) -> None:
        self.db.execute(f"DELETE FROM {table} WHERE id = ?", (id_,))

    # ---- jobs -------------------------------------------------------------------------------------------------
    def event(self, job: str, message: str, level: str = "info", type_: str = "message", data=None) -> None:
        self.insert("events", id=new_id("ftevent"), job=job, created_at=int(time.time()), level=level, type=type_,
                    message=message, data=data)

    def jobs_in(self, *statuses: str) -> list[dict]:
        marks = ", ".join("?" * len(statuses))
        return [self._row(r) for r in self.db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY rowid",
                                                       statuses).fetchall()]

    def model_path(self, name: str) -> tuple[str, str] | None:
        """(folder, owner) of a fine-tuned model or checkpoint by its name, or None (also once deleted)."""
        if self.db.execute("SELECT 1 FROM deleted WHERE model = ?", (name,)).fetchone():
            return None
        row = self.db.execute("SELECT id, owner FROM jobs WHERE fine_tuned_model = ? AND status = 'succeeded'",
                              (name,)).fetchone()
        if row is not None:
            return str(self.jobs_dir / row["id"] / "model"), row["owner"]
        row = self.db.execute("SELECT c.path, j.owner FROM checkpoints c JOIN jobs j ON c.job = j.id "
                              "WHERE c.model = ?", (name,)).fetchone()
        return (row[0], row[1]) if row is not None else None

    def models(self, owner: str | None) -> list[str]:
        """Names of the fine-tuned models and checkpoints this owner (None: anyone) can use, oldest first."""
        mine = "" if owner is None else " AND j.owner = ?"
        args = () if owner is None else (owner,)
        done = self.db.execute(f"SELECT fine_tuned_model FROM jobs j WHERE status = 'succeeded'{mine} ORDER BY rowid",
                               args).fetchall()
        ckpts = self.db.execute(f"SELECT c.model FROM checkpoints c JOIN jobs j ON c.job = j.id WHERE 1 = 1{mine} "
                                "ORDER BY c.rowid", args).fetchall()
        gone = {r[0] for r in self.db.execute("SELECT model FROM deleted").fetchall()}
        return [r[0] for r in done + ckpts if r[0] not in gone]
