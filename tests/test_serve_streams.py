"""Server-sent streams against the engine thread: a sequence may finish between any two reads the stream makes of
it, and the deltas must still add up to the whole text, once, with a single finish chunk."""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from fmkit.server import generation as G
from fmkit.server.engine import Params, Sequence

FULL = "The quick brown fox jumps over the lazy dog."


class FinishesWhenRead(Sequence):
    """A sequence that the engine finishes at the moment the stream reads its partial text (as when the compute
    thread takes the GIL right then), after `reads` partial reads."""

    def __init__(self, reads: int):
        super().__init__([1, 2, 3], Params(max_tokens=8))
        self.reads = reads
        self._text = self._visible = FULL[:10]

    @property
    def visible(self) -> str:
        shown = self._visible
        self.reads -= 1
        if self.reads == 0:   # what Engine._finish writes, in its order: the whole text, then the reason
            self._text = self._visible = FULL
            self._final = True
            self.finish_reason = "length"
        return shown


def fake_job(seq: Sequence, interval: float = 0.0) -> G.Job:
    """A Job around one sequence, without an engine: the test plays the engine's part."""
    job = G.Job.__new__(G.Job)
    job.seqs, job.event, job.finished = [seq], asyncio.Event(), asyncio.Event()
    job.asked, job.interval, job.sent = time.monotonic(), interval, 0.0
    job.served = SimpleNamespace(fingerprint="fp_test", tok=None)
    job.event.set()
    return job


async def _connected() -> bool:
    return False


REQUEST = SimpleNamespace(is_disconnected=_connected)   # a client that stays


def context() -> dict:
    return dict(forced=False, tools=set(), screens={}, include_usage=False, prompt_tokens=3)


def events(text: str) -> list[dict]:
    """The JSON events in one write (several may come in one)."""
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


def run_stream(make, seq) -> list[dict]:
    async def go():
        job = fake_job(seq)
        out = []
        async for text in make(job, context(), REQUEST, "m"):
            out += events(text)
            job.event.set()   # progress for the next round
        return out

    return asyncio.run(asyncio.wait_for(go(), 10))


@pytest.mark.parametrize("reads", [1, 2, 3])
def test_chat_stream_sends_the_whole_text_when_the_sequence_finishes_mid_read(reads):
    chunks = run_stream(G.chat_stream, FinishesWhenRead(reads))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert text == FULL
    assert reasons == ["length"]


@pytest.mark.parametrize("reads", [1, 2, 3])
def test_completion_stream_sends_the_whole_text_when_the_sequence_finishes_mid_read(reads):
    chunks = run_stream(G.completion_stream, FinishesWhenRead(reads))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert text == FULL
    assert reasons == ["length"]


def test_the_end_of_a_stream_is_not_held_back_by_the_stream_interval():
    """A stream sends at most one chunk per interval, but a sequence that finishes while its stream waits out
    the interval is sent at once: its client sends the next request only when it has seen the end."""
    seq = Sequence([1, 2, 3], Params(max_tokens=8))
    seq._text = FULL[:10]

    async def go():
        loop = asyncio.get_running_loop()
        job = fake_job(seq, interval=10.0)

        def progress():   # what the engine thread's notes do, on the event loop: more text, then the end
            seq._text = FULL[:20]
            job._moved()

        def end():
            seq._text, seq._final, seq.finish_reason = FULL, True, "length"
            job._moved()

        start, writes = time.monotonic(), []
        async for text in G.chat_stream(job, context(), REQUEST, "m"):
            writes.append((time.monotonic() - start, text))
            if len(writes) == 1:
                loop.call_later(0.05, progress)   # wakes the stream, which then waits out the interval...
                loop.call_later(0.2, end)         # ...during which the sequence finishes
        return writes

    writes = asyncio.run(asyncio.wait_for(go(), 5))
    assert writes[-1][0] < 2, "the end waited for the stream interval"
    assert isinstance(writes[-1][1], G.Last) and writes[-1][1].endswith("data: [DONE]\n\n")
    deltas = [e["choices"][0]["delta"].get("content") or "" for _, text in writes for e in events(text)]
    assert "".join(deltas) == FULL
