"""The arena's web application: two pages (the arena, the ratings) and the JSON API they use.

    GET  /                          the arena page: a prompt, two anonymous answers side by side, the vote
    GET  /ratings                   the ratings page
    GET  /api/config                how many candidates, whether prompts can be drawn, whether voters need keys
    GET  /api/prompt                a prompt drawn from the prompts file
    POST /api/rounds                {prompt, voter} -> {round, prompt}: two candidates start answering
    GET  /api/rounds/ROUND/SIDE     one answer (SIDE a: left, b: right) as server-sent events: `data: {"text"}`
                                    pieces, then `event: done` with {"answer", "error"}
    POST /api/votes                 {round, winner: a | b | tie | both_bad, voter} -> the vote and both models
    GET  /api/ratings               Bradley–Terry ratings, win rates, position bias, rejected votes, judge agreement

Which two candidates meet, and which is on the left, is drawn at random when the round starts and written down
before anything is shown. Answers are made in threads as soon as the round starts (so the second page to connect
has not lost time), kept until the vote, and stored with the round; the model names leave the server only in the
answer to the vote. Everything refused is a 4xx with {"error": {"message", "reason"}} and counted in the store.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import threading
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ..errors import FmkitError
from ..providers import Model
from .arena_pages import ARENA_PAGE, RATINGS_PAGE
from .arena_standings import standings
from .arena_store import ArenaStore, Rejected
from .candidates import Candidates, open_model, request, uses_chat

KEEP_ROUNDS = 1000   # answers of unvoted rounds kept in memory (the store keeps every round)


class Answer:
    """One side's answer as it grows. Readers are the server's event loop: they wait on an asyncio.Event that the
    answering thread sets, so a waiting stream holds no thread."""

    def __init__(self):
        self.pieces: list[str] = []
        self.done, self.error = False, ""
        self._lock = threading.Lock()
        self._waiters: set = set()   # (loop, asyncio.Event) of each reader waiting for news

    def _tell(self) -> None:
        for loop, news in list(self._waiters):
            with contextlib.suppress(RuntimeError):   # a loop already closed has no reader left
                loop.call_soon_threadsafe(news.set)

    def add(self, piece: str) -> None:
        with self._lock:
            self.pieces.append(piece)
        self._tell()

    def finish(self, error: str = "") -> None:
        with self._lock:
            self.done, self.error = True, error
        self._tell()

    async def follow(self):
        """Every piece from the first, each as soon as it is made, until the answer is finished."""
        waiter, seen = (asyncio.get_running_loop(), asyncio.Event()), 0
        with self._lock:
            self._waiters.add(waiter)
        try:
            while True:
                waiter[1].clear()   # before reading: news that comes after the read sets it again
                with self._lock:
                    fresh, done = self.pieces[seen:], self.done
                seen += len(fresh)
                for piece in fresh:
                    yield piece
                if done:
                    return
                await waiter[1].wait()
        finally:
            with self._lock:
                self._waiters.discard(waiter)


class Arena:
    """Candidates, their models (opened once), the prompts to draw from, the voters, the store and live rounds."""

    def __init__(self, cands: Candidates, store: ArenaStore, prompts: list[str] | None = None,
                 voters: dict[str, str] | None = None, seed: int | None = None, workspace=None,
                 models: dict[str, Model] | None = None):
        self.candidates = {c.name: c for c in cands.candidates}
        if len(self.candidates) < 2:
            raise FmkitError(f"{cands.source}: an arena needs at least two candidates")
        self.store, self.prompts, self.voters, self.workspace = store, list(prompts or []), voters, workspace
        self.models: dict[str, Model] = dict(models or {})
        self.rng = random.Random(seed)
        self._open = threading.Lock()
        self._busy = {name: threading.Lock() for name in self.candidates}   # a local model answers one at a time
        self.live: OrderedDict[str, dict[str, Answer]] = OrderedDict()
        self._live = threading.Lock()

    def model(self, name: str) -> Model:
        with self._open:
            if name not in self.models:
                self.models[name] = open_model(self.candidates[name], self.workspace)
            return self.models[name]

    def open_all(self) -> None:
        for name in self.candidates:
            self.model(name)

    def answers(self, round_id: str) -> dict[str, Answer] | None:
        """The answers of a round still in memory (not yet voted on), by side."""
        with self._live:
            return self.live.get(round_id)

    def voter(self, given) -> str:
        """The voter's name: as given, or the name behind a voter key when the arena has a voters file."""
        given = given.strip() if isinstance(given, str) else ""
        if not given:
            raise Rejected(400, "no_voter", "say who you are: enter your " + ("voter key" if self.voters else "name")
                           + " first")
        if self.voters is None:
            return given[:100]
        if given not in self.voters:
            raise Rejected(403, "unknown_voter", "that voter key is not in the arena's voters file; ask its host "
                                                 "for one")
        return self.voters[given]

    def draw(self) -> str:
        if not self.prompts:
            raise Rejected(400, "no_prompt", "type a prompt (this arena has no prompts file to draw from)")
        return self.rng.choice(self.prompts)

    def start_round(self, prompt, voter) -> dict:
        """Draw two candidates and their sides, write the round down, and start both answers."""
        name = self.voter(voter)
        if prompt is not None and not isinstance(prompt, str):
            raise Rejected(400, "bad_request", "prompt must be text")
        prompt = (prompt or "").strip() or self.draw()
        left, right = self.rng.sample(sorted(self.candidates), 2)   # a random pair, in a random order
        round_id = secrets.token_urlsafe(9)
        self.store.new_round(round_id, prompt, name, left, right)
        answers = {"a": Answer(), "b": Answer()}
        with self._live:
            self.live[round_id] = answers
            while len(self.live) > KEEP_ROUNDS:
                self.live.popitem(last=False)
        for side, model in (("a", left), ("b", right)):
            threading.Thread(target=self._answer, args=(round_id, side, model, prompt, answers[side]),
                             daemon=True).start()
        return {"round": round_id, "prompt": prompt}

    def _answer(self, round_id: str, side: str, name: str, prompt: str, answer: Answer) -> None:
        c, text, error = self.candidates[name], "", ""
        try:
            model = self.model(name)
            req = request(c, uses_chat(c, model), prompt, {}, "the arena's prompt")
            lock = self._busy[name] if hasattr(model, "enc") else contextlib.nullcontext()
            with lock:
                for piece in model.stream(req):
                    text += piece
                    answer.add(piece)
        except Exception as e:   # a failed answer is shown as such and kept with the round, not a dead server
            error = str(e) if isinstance(e, FmkitError) else f"{type(e).__name__}: {e}"
        try:
            self.store.set_answer(round_id, side, text, error)   # stored before `done` is sent: a vote may follow
        finally:
            answer.finish(error)

    def vote(self, round_id, winner, voter) -> dict:
        name = self.voter(voter)
        if not isinstance(round_id, str) or not isinstance(winner, str):
            raise Rejected(400, "bad_request", "a vote needs round and winner as text")
        vote = self.store.vote(round_id, winner, name)
        with self._live:
            self.live.pop(round_id, None)
        return vote


def create_app(arena: Arena, bootstrap: int = 200) -> FastAPI:
    """The FastAPI app over an Arena."""
    store = arena.store
    memo: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        store.close()

    app = FastAPI(title="fmkit arena", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.arena = arena

    def refuse(e: Rejected, round_id=None, voter=None) -> JSONResponse:
        # with a voters file what was typed may be someone's key: it is not written down
        voter = voter if isinstance(voter, str) and arena.voters is None else None
        store.reject(e.reason, round_id if isinstance(round_id, str) else None, voter, e.message)
        return JSONResponse({"error": {"message": e.message, "reason": e.reason}}, e.status)

    async def body(req: Request) -> dict:
        try:
            doc = json.loads(await req.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Rejected(400, "bad_request", "the request body must be a JSON object") from None
        if not isinstance(doc, dict):
            raise Rejected(400, "bad_request", "the request body must be a JSON object")
        return doc

    @app.get("/", response_class=HTMLResponse)
    async def arena_page():
        return ARENA_PAGE

    @app.get("/ratings", response_class=HTMLResponse)
    async def ratings_page():
        return RATINGS_PAGE

    @app.get("/api/config")
    async def config():
        return {"candidates": len(arena.candidates), "prompts": len(arena.prompts),
                "voter_keys": arena.voters is not None, "votes": store.count_votes()}

    @app.get("/api/prompt")
    async def prompt():
        try:
            return {"prompt": arena.draw()}
        except Rejected as e:
            return refuse(e)

    @app.post("/api/rounds")
    async def new_round(req: Request):
        doc = {}
        try:
            doc = await body(req)
            return await asyncio.to_thread(arena.start_round, doc.get("prompt"), doc.get("voter"))
        except Rejected as e:
            return refuse(e, voter=doc.get("voter"))

    @app.get("/api/rounds/{round_id}/{side}")
    async def answer_stream(round_id: str, side: str):
        if side not in ("a", "b"):
            return refuse(Rejected(404, "unknown_side", f"side must be a (left) or b (right), got {side!r}"),
                          round_id)
        live = arena.answers(round_id)
        if live is None:
            stored = await asyncio.to_thread(store.round, round_id)
            if stored is None:
                return refuse(Rejected(404, "unknown_round", f"there is no round {round_id!r}; start a new round"),
                              round_id)
            done = Answer()   # a round from before a restart, or already voted: its stored answer, whole
            if stored[f"answer_{side}"] is not None:
                done.add(stored[f"answer_{side}"])
            done.finish(stored[f"error_{side}"] or ("" if stored[f"answer_{side}"] is not None else
                                                    "the server stopped before this answer was complete"))
            live = {side: done}

        async def events():
            answer = live[side]
            async for piece in answer.follow():
                yield f"data: {json.dumps({'text': piece}, ensure_ascii=False)}\n\n"
            done = {"answer": "".join(answer.pieces), "error": answer.error}
            yield f"event: done\ndata: {json.dumps(done, ensure_ascii=False)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.post("/api/votes")
    async def vote(req: Request):
        doc = {}
        try:
            doc = await body(req)
            v = await asyncio.to_thread(arena.vote, doc.get("round"), doc.get("winner"), doc.get("voter"))
        except Rejected as e:
            return refuse(e, doc.get("round"), doc.get("voter"))
        return {"vote": v["id"], "round": v["round"], "winner": v["winner"], "model_a": v["model_a"],
                "model_b": v["model_b"], "votes": store.count_votes()}

    @app.get("/api/ratings")
    async def ratings(length_control: bool = False):
        return await asyncio.to_thread(standings, store, length_control, bootstrap, 0, memo)

    return app
