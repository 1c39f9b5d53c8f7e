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


def run_stream(make, seq) -> list[dict]:
    async def go():
        job = G.Job.__new__(G.Job)
        job.seqs, job.event, job.asked, job.interval, job.sent = [seq], asyncio.Event(), time.monotonic(), 0.0, 0.0
        job.served = SimpleNamespace(fingerprint="fp_test", tok=None)
        job.event.set()

        async def connected():
            return False

        request = SimpleNamespace(is_disconnected=connected)
        ctx = dict(forced=False, tools=set(), screens={}, include_usage=False, prompt_tokens=3)
        out = []
        async for text in make(job, ctx, request, "m"):
            for event in text.split("\n\n"):   # several events may come in one write
                if event.startswith("data: {"):
                    out.append(json.loads(event[6:]))
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
