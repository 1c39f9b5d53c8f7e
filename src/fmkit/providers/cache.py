"""An on-disk response cache (SQLite): the same request to the same model is answered once.

Keys are a hash of (model, method, request). Only deterministic requests should be cached (temperature 0, or a
fixed seed); callers decide. Safe across threads and processes (SQLite WAL, one connection per thread).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        if not hasattr(self._local, "db"):
            self._local.db = sqlite3.connect(self.path, timeout=60)
        return self._local.db

    @staticmethod
    def key(model: str, method: str, request) -> str:
        blob = json.dumps([model, method, request], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str):
        row = self._db().execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(value)))
