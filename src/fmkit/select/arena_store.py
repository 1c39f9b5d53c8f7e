"""The arena's votes in one SQLite file (default <workspace>/arena/NAME.db): rounds, votes, rejected votes and
the judge's verdicts.

A round is a prompt with two anonymous answers: A is the one shown on the left, B on the right, and which model
was on which side is written down when the round starts, before anyone sees an answer. A vote copies the round's
prompt, answers and sides, so the votes table stands on its own (export and ratings read it alone). Every vote the
server refuses is a row in `rejected` with its reason, so nothing is dropped silently.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    id TEXT PRIMARY KEY, time TEXT NOT NULL, prompt TEXT NOT NULL, voter TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, answer_a TEXT, answer_b TEXT, error_a TEXT, error_b TEXT,
    voted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round TEXT NOT NULL UNIQUE REFERENCES rounds(id), time TEXT NOT NULL,
    voter TEXT NOT NULL, prompt TEXT NOT NULL, model_a TEXT NOT NULL, model_b TEXT NOT NULL,
    answer_a TEXT NOT NULL, answer_b TEXT NOT NULL, winner TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, reason TEXT NOT NULL, round TEXT, voter TEXT,
    detail TEXT);
CREATE TABLE IF NOT EXISTS judgements (
    vote INTEGER NOT NULL REFERENCES votes(id), judge TEXT NOT NULL, winner TEXT NOT NULL,
    verdicts TEXT NOT NULL, time TEXT NOT NULL, PRIMARY KEY (vote, judge));
"""

WINNERS = ("a", "b", "tie", "both_bad")
VOTE_COLUMNS = ("id", "round", "time", "voter", "prompt", "model_a", "model_b", "answer_a", "answer_b", "winner")


class Rejected(Exception):
    """A vote or round the server refuses: the HTTP status, a reason to count it under, and a message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ArenaStore:
    """One arena database; safe to use from the server's threads (one connection, one lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock, self._db:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    # ---- meta ----------------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        self._run("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str, default: str = "") -> str:
        rows = self._all("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    # ---- rounds and votes ----------------------------------------------------------------------------------
    def new_round(self, round_id: str, prompt: str, voter: str, model_a: str, model_b: str) -> None:
        self._run("INSERT INTO rounds (id, time, prompt, voter, model_a, model_b) VALUES (?, ?, ?, ?, ?, ?)",
                  (round_id, now(), prompt, voter, model_a, model_b))

    def set_answer(self, round_id: str, side: str, text: str, error: str = "") -> None:
        if side not in ("a", "b"):   # the column name is spliced into the SQL
            raise ValueError(f"side must be a or b, got {side!r}")
        self._run(f"UPDATE rounds SET answer_{side} = ?, error_{side} = ? WHERE id = ?", (text, error, round_id))

    def round(self, round_id: str) -> dict | None:
        rows = self._all("SELECT * FROM rounds WHERE id = ?", (round_id,))
        return rows[0] if rows else None

    def vote(self, round_id: str, winner: str, voter: str) -> dict:
        """Record the vote on a round, or raise Rejected (the caller counts it with `reject`)."""
        if winner not in WINNERS:
            raise Rejected(400, "bad_winner", f"winner must be one of {', '.join(WINNERS)}, got {winner!r}")
        with self._lock, self._db:
            r = self._db.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
            if r is None:
                raise Rejected(404, "unknown_round", f"there is no round {round_id!r}; start a new round")
            if r["voter"] != voter:
                raise Rejected(403, "wrong_voter", f"round {round_id!r} was started by another voter; start a round "
                                                   "of your own")
            if r["voted"]:
                raise Rejected(409, "already_voted", f"round {round_id!r} has already been voted on; start a new "
                                                     "round")
            if r["answer_a"] is None or r["answer_b"] is None:
                raise Rejected(409, "unfinished", f"round {round_id!r} is still answering; vote when both answers "
                                                  "are complete")
            self._db.execute("UPDATE rounds SET voted = 1 WHERE id = ?", (round_id,))
            row = (round_id, now(), voter, r["prompt"], r["model_a"], r["model_b"], r["answer_a"], r["answer_b"],
                   winner)
            cur = self._db.execute(f"INSERT INTO votes ({', '.join(VOTE_COLUMNS[1:])}) VALUES "
                                   f"({', '.join('?' * len(row))})", row)
        return dict(zip(VOTE_COLUMNS, (cur.lastrowid, *row)))

    def votes(self) -> list[dict]:
        return self._all(f"SELECT {', '.join(VOTE_COLUMNS)} FROM votes ORDER BY id")

    def count_votes(self) -> int:
        return self._all("SELECT COUNT(*) AS n FROM votes")[0]["n"]

    def reject(self, reason: str, round_id: str | None = None, voter: str | None = None, detail: str = "") -> None:
        self._run("INSERT INTO rejected (time, reason, round, voter, detail) VALUES (?, ?, ?, ?, ?)",
                  (now(), reason, round_id, voter, detail[:500]))

    def rejections(self) -> dict:
        """{reason: count} of everything refused."""
        return {r["reason"]: r["n"] for r in self._all("SELECT reason, COUNT(*) AS n FROM rejected GROUP BY reason "
                                                       "ORDER BY n DESC, reason")}

    # ---- the judge's verdicts ------------------------------------------------------------------------------
    def judgements(self, judge: str) -> dict[int, dict]:
        """{vote id: {"winner", "verdicts"}} the judge has given."""
        return {r["vote"]: {"winner": r["winner"], "verdicts": r["verdicts"]}
                for r in self._all("SELECT vote, winner, verdicts FROM judgements WHERE judge = ?", (judge,))}

    def judges(self) -> list[str]:
        return [r["judge"] for r in self._all("SELECT DISTINCT judge FROM judgements ORDER BY judge")]

    def add_judgement(self, vote_id: int, judge: str, winner: str, verdicts: str) -> None:
        self._run("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?)", (vote_id, judge, winner, verdicts,
                                                                                now()))
