"""Continuous batching: one engine per loaded model, all engines stepped by one compute thread.

An engine's KV cache has a fixed number of rows. A request's sequences (one per choice, `n`) wait in a bounded
queue and take a free row when one is there. Each iteration is one call of the model (`LlamaDecoder.step_rows`)
that advances every decoding sequence by one token, each at its own cache slot, and in the same call prefills up
to `chunk` prompt tokens of the sequences that joined, first come first: a long prompt never stalls the others for
more than one chunk, and a short one costs no call of its own. A sequence leaves as soon as it is finished and
its row goes to the next in the queue: nobody waits for the slowest.

Each sequence samples with its own seeded generator from its own logits, and the compiled step computes every
token, prompt tokens included, with the same arithmetic whatever else is in the call, so a seeded (or greedy)
request's text depends neither on its neighbours nor on where its prompt was cut into chunks. A request that fails
inside the model fails alone: a call that raises is retried sequence by sequence and only those that still raise
are failed.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import random
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..models.generate import IncrementalText, argmax_ids
from .codec import Codec
from .sampling import choose, top_logprobs


# seeds of unseeded requests: the server's own generator, which no caller's random.seed() repeats
_SEEDS = random.Random()


class QueueFull(Exception):
    """The engine's queue is full; the caller should retry later (HTTP 429)."""


class PromptTooLong(ValueError):
    """Prompt + max_tokens exceed the context (HTTP 400)."""


@dataclass
class Params:
    """How one sequence is generated (the OpenAI request's sampling fields, already checked)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None          # None: none; k >= 0: the chosen token's and the k most likely
    prompt_logprobs: int | None = None   # echo: the prompt tokens' own log-probabilities (and k most likely)
    ignore_eos: bool = False
    guide: object = None                 # constrain.TokenGuide for JSON output, or None


class Sequence:
    """One choice of one request, as the engine advances it. The engine thread writes; readers (the HTTP side)
    only read fields that are replaced whole (str, tuple) or appended to (lists), and are told by `notify`.

    The text of a sequence without stop strings or a JSON guide is decoded when it is read, from the tokens so
    far: a stream reads it once a round, not once a token, and the engine thread, whose every microsecond delays
    every row, does not decode at all until the sequence finishes. The others are decoded token by token on the
    engine thread, which must see the text to stop it."""

    def __init__(self, prompt: list[int], params: Params, index: int = 0, notify=None):
        self.prompt, self.params, self.index, self.notify = prompt, params, index, notify
        self.tokens: list[int] = []
        self.logprobs: list[tuple] = []   # per token: (id, logprob, [(id, logprob), ...])
        self.prompt_logprobs: list[tuple] | None = None  # per prompt token, the first None
        self.finish_reason: str | None = None  # stop | length | error | cancelled
        self.error: str = ""
        self.cancelled = False
        self.row: int | None = None
        self.prefilled = 0
        self.forced: list[int] = []
        seed = params.seed if params.seed is not None else _SEEDS.getrandbits(62)
        self.seed = (seed + index * 1_000_003) % (1 << 64)   # choices of one seed differ; manual_seed takes 64 bits
        self._gen = None
        self.t_submit, self.t_first, self.t_done = time.monotonic(), 0.0, 0.0
        self.on_read = not params.stop and params.guide is None   # text decoded by its readers
        self._inc = None                  # IncrementalText once the first token is there
        self._text = self._visible = ""   # written by the engine (finished sequences, and the others as they go)
        self._final = False               # _text is the whole completion
        self._prev = None                 # log-probabilities after the last prefilled chunk (echo)

    @property
    def text(self) -> str:
        """The completion so far (cut at a stop string when one is hit)."""
        if self._final or not self.on_read or self._inc is None:
            return self._text
        return self._inc.add(self.tokens[:])   # a copy: the engine thread may append meanwhile

    @property
    def visible(self) -> str:
        """What may be shown while streaming: never part of a possible stop string."""
        return self.text if self.on_read else self._visible

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def gen(self) -> torch.Generator:
        """The sequence's own random generator, made when it first samples (greedy ones never do; making one
        is a torch call that gives up the event loop's hold on the interpreter)."""
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        return self._gen


class Engine:
    """Owns a runner (the model and its cache rows) and serves sequences from a bounded queue."""

    def __init__(self, runner, tok, eos_ids: set[int], max_queue: int = 256, chunk: int = 256, observe=None,
                 compute: "Compute | None" = None, notify_every: float = 0.0):
        self.runner, self.tok, self.eos_ids = runner, tok, eos_ids
        self.max_queue, self.chunk, self.observe = max_queue, chunk, observe or (lambda *a: None)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []
        self.free = list(range(runner.rows))[::-1]
        self.lock = threading.Lock()
        self.stopping = False
        self.deliver = lambda notes: [note() for note in notes]   # the server hands these to its event loop
        self._notes: dict[int, object] = {}
        self.notify_every = notify_every   # seconds between hand-overs of progress (first tokens, ends: at once)
        self._urgent, self._delivered = False, 0.0
        self.codec = Codec(tok)
        self.compute = compute or Compute.default()
        self.compute.add(self)

    def encode(self, text: str) -> list[int]:
        """The prompt's token ids; PromptTooLong, without tokenizing, for a text too long to fit the context
        whatever its tokens (tokenizing megabytes would hold the event loop for seconds)."""
        if self.codec.longest and len(text) > self.context * self.codec.longest:
            raise PromptTooLong(f"this model's context is {self.context} tokens; a prompt of {len(text)} characters "
                                f"has more than that (no token of this model is longer than {self.codec.longest} "
                                "characters)")
        return self.codec.encode(text)

    @property
    def context(self) -> int:
        return self.runner.length

    @property
    def busy(self) -> int:
        """Sequences queued or running."""
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences (all or none); QueueFull when the queue has no room for them."""
        for s in seqs:
            need = len(s.prompt) + s.params.max_tokens
            if not s.prompt or need > self.context:
                raise PromptTooLong(
                    f"this model's context is {self.context} tokens; the prompt has {len(s.prompt)} and "
                    f"max_tokens asks for {s.params.max_tokens} more ({need})")
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"the queue for this model is full ({self.max_queue} waiting)")
            self.waiting.extend(seqs)
        self.compute.wake()

    def stop(self, wait: float = 30.0) -> None:
        """Refuse new requests, let what is running finish (up to `wait` seconds), then leave the compute thread."""
        with self.lock:
            self.stopping = True
        deadline = time.monotonic() + wait
        while self.busy and time.monotonic() < deadline and self.compute.alive:
            time.sleep(0.01)
        self.compute.remove(self)

    # ---- one iteration, run by the compute thread ----------------------------------------------------------------
    def iterate(self) -> None:
        """Admit waiting sequences to free rows, then one call: every decoding sequence and a chunk of prompts."""
        with self.lock:
            while self.waiting and self.free:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    self._finish(seq, "cancelled")
                    continue
                seq.row = self.free.pop()
                self.prefilling.append(seq)
        try:
            self._iterate()
        except Exception as e:  # a bug in the loop itself: fail what is running, keep serving
            for seq in self.prefilling + self.decoding:
                self._fail(seq, e)
            self.prefilling, self.decoding = [], []
        now = time.monotonic()
        if self._notes and (self._urgent or now - self._delivered >= self.notify_every):
            notes, self._notes = list(self._notes.values()), {}   # one hand-over, however many moved
            self._urgent, self._delivered = False, now
            self.deliver(notes)

    def _iterate(self) -> None:
        for seq in [s for s in self.prefilling + self.decoding if s.cancelled]:
            self._finish(seq, "cancelled")
        parts = [(s, [s.tokens[-1]], len(s.prompt) + len(s.tokens) - 1, "last") for s in self.decoding]
        decoding = len(parts)   # the first parts; then prompt chunks
        budget = self.chunk   # prompt tokens this call, from the sequences that joined first
        for seq in self.prefilling:
            if budget <= 0:
                break
            take = seq.prompt[seq.prefilled:seq.prefilled + budget]
            ends = seq.prefilled + len(take) == len(seq.prompt)
            wants = "every" if seq.params.prompt_logprobs is not None else "last" if ends else "none"
            parts.append((seq, take, seq.prefilled, wants))
            budget -= len(take)
        if not parts:
            return
        try:
            logits, spans = self._run(parts)
            best = argmax_ids(logits, decoding)   # the decoding parts' rows come first, one each
            chunks = [logits[a:b] for a, b in spans[decoding:]]
        except Exception:   # find who fails; rewriting a slot is harmless
            logits, outs = None, []
            for part in parts:
                try:
                    outs.append(self._run([part])[0])
                except Exception as e:
                    self._fail(part[0], e)
                    outs.append(None)
            chunks = outs[decoding:]
        self.observe("batch", decoding)
        for i, (seq, _, _, _) in enumerate(parts[:decoding]):
            if logits is None:   # retried alone: its own row of logits, unless it failed
                if outs[i] is not None:
                    self._advance(seq, outs[i][-1])
            elif _plain_greedy(seq):   # greedy without penalties or logprobs: the batch's argmax, no logits
                self._advance(seq, None, best[i])
            else:
                self._advance(seq, logits[i], best[i] if _plain_greedy(seq, logprobs_too=True) else None)
        for (seq, take, start, wants), out in zip(parts[decoding:], chunks):
            if out is None:
                continue
            if wants == "every":
                self._prompt_logprobs(seq, take, out)
            seq.prefilled += len(take)
            if seq.prefilled == len(seq.prompt):
                self.prefilling.remove(seq)
                if seq.params.max_tokens == 0:
                    self._finish(seq, "length")
                else:
                    self.decoding.append(seq)
                    self._advance(seq, out[-1])

    def _run(self, parts: list) -> tuple[torch.Tensor, list]:
        """One call of the model for these (sequence, tokens, first slot, wanted logits) parts: a decoding
        sequence's last token, or a chunk of a prompt. The logits, and each part's span of rows in them: its last
        token's, every token's, or none."""
        ids, rows, slots, want, spans = [], [], [], [], []
        for seq, take, start, wants in parts:
            at = len(ids)
            ids += take
            rows += [seq.row] * len(take)
            slots += range(start, start + len(take))
            picked = range(at, len(ids)) if wants == "every" else [len(ids) - 1] if wants == "last" else []
            spans.append((len(want), len(want) + len(picked)))
            want += picked
        return self.runner.run(ids, rows, slots, want), spans

    def _prompt_logprobs(self, seq: Sequence, chunk: list[int], logits: torch.Tensor) -> None:
        """Each prompt token's log-probability given the ones before it (the first has none)."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        lp = torch.log_softmax(logits.float(), -1)
        k = seq.params.prompt_logprobs
        if seq._prev is not None:
            lp = torch.cat([seq._prev[None], lp])
            chunk_tokens = chunk
        else:
            chunk_tokens = chunk[1:]
        for row, t in zip(lp, chunk_tokens):
            seq.prompt_logprobs.append((t, row[t].item(), top_logprobs(row, k)))
        seq._prev = lp[-1]

    def _advance(self, seq: Sequence, logits: torch.Tensor | None, token: int | None = None) -> None:
        """Choose the sequence's next token from its logits (unless given), append it, finish it if it is done."""
        try:
            p = seq.params
            if token is not None:
                pass
            elif seq.forced:
                token = seq.forced.pop(0)
            else:
                room = min(p.max_tokens - len(seq.tokens), self.context - len(seq.prompt) - len(seq.tokens))
                token, seq.forced = choose(seq, logits, self.encode, room)
            if token in self.eos_ids and not p.ignore_eos:
                return self._finish(seq, "stop")
            seq.tokens.append(token)
            if p.logprobs is not None:
                lp = torch.log_softmax(logits.float(), -1)
                seq.logprobs.append((token, lp[token].item(), top_logprobs(lp, p.logprobs)))
            if seq._inc is None:
                seq._inc = IncrementalText(self.codec)
                seq.t_first = time.monotonic()
            if not seq.on_read:
                text = seq._inc.add(seq.tokens)
                hit = [text.index(s) for s in p.stop if s in text]
                if hit:
                    return self._finish(seq, "stop")
                hold = max((len(s) for s in p.stop), default=1) - 1
                seq._text, seq._visible = text, text[:len(text) - hold] if hold else text
                if p.guide is not None and not seq.forced and p.guide.constraint.complete(text):
                    return self._finish(seq, "stop")
            if len(seq.tokens) >= p.max_tokens or len(seq.prompt) + len(seq.tokens) >= self.context:
                return self._finish(seq, "length")
            self._note(seq, len(seq.tokens) == 1)
        except Exception as e:
            self._fail(seq, e)

    def _fail(self, seq: Sequence, e: Exception) -> None:
        seq.error = f"{type(e).__name__}: {e}"[:500]
        self._finish(seq, "error")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finished:
            return
        if reason in ("stop", "length") and seq._inc is not None:   # the whole text, then the reason
            full = self.codec.decode(seq.tokens)
            hit = [full.index(s) for s in seq.params.stop if s in full]
            seq._text = seq._visible = full[:min(hit)] if hit else full
            seq._final = True
        seq.t_done = time.monotonic()
        seq.finish_reason = reason
        for group in (self.prefilling, self.decoding):
            if seq in group:
                group.remove(seq)
        if seq.row is not None:
            self.runner.release(seq.row)
            self.free.append(seq.row)
            seq.row = None
        self.observe("finished", seq)
        self._note(seq, True)

    def _note(self, seq: Sequence, urgent: bool = False) -> None:
        if seq.notify is not None:
            self._notes[id(seq.notify)] = seq.notify
            self._urgent = self._urgent or urgent


class Compute:
    """The one thread that runs models: every engine's steps, and model loads and embeddings in between.

    Running all of it on one thread matters on a CPU: an OpenMP team (PyTorch's, and the compiled step's) made
    by any other thread that ran tensor work slowed this one's steps by ~20% (measured at batch 16), and two
    engines stepping at once would only fight over the same cores. Several loaded models take turns, one step
    each."""

    _default: "Compute | None" = None

    def __init__(self):
        self.engines: list[Engine] = []
        self.jobs: collections.deque = collections.deque()
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="fmkit-compute", daemon=True)
        self.thread.start()

    @classmethod
    def default(cls) -> "Compute":
        if cls._default is None or not cls._default.alive:
            cls._default = cls()
        return cls._default

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def run(self, fn, *args):
        """fn(*args) on the compute thread, between steps; its result, or what it raised."""
        if threading.current_thread() is self.thread:
            return fn(*args)
        done = Future()
        with self.cv:
            self.jobs.append((done, fn, args))
            self.cv.notify()
        return done.result()

    def add(self, engine: Engine) -> None:
        with self.cv:
            self.engines.append(engine)

    def remove(self, engine: Engine) -> None:
        with self.cv:
            if engine in self.engines:
                self.engines.remove(engine)

    def wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def _loop(self) -> None:
        _name_os_thread(self.thread.name)
        while True:
            with self.cv:
                while not self.jobs and not any(e.busy for e in self.engines):
                    self.cv.wait(0.5)
                job = self.jobs.popleft() if self.jobs else None
                engines = [e for e in self.engines if e.busy]
            if job is not None:
                done, fn, args = job
                try:
                    done.set_result(fn(*args))
                except BaseException as e:
                    done.set_exception(e)
            for engine in engines:
                engine.iterate()
            # nothing of this pass outlives it: a model unloaded meanwhile (the last load's result, an engine
            # stepped last) would stay in memory while this thread waits for work
            job = done = fn = args = engine = engines = None


def _name_os_thread(name: str) -> None:
    """Give the calling thread its name in the operating system too (Python before 3.14 leaves every thread
    named after the process), so that `top -H`, `ps -L` and /proc tell the compute thread apart. Threads it
    starts afterwards, such as its OpenMP team, inherit the name. Linux only; elsewhere nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)   # PR_SET_NAME


def _plain_greedy(seq: Sequence, logprobs_too: bool = False) -> bool:
    """Whether the batch's argmax is this sequence's token (and, unless `logprobs_too`, its logits unused)."""
    p = seq.params
    return (p.temperature <= 0 and not p.logit_bias and not p.presence_penalty and not p.frequency_penalty
            and p.guide is None and not seq.forced and (logprobs_too or p.logprobs is None))


class DecoderRunner:
    """Llama-style models on fmkit's decoder: one KV cache of `rows` rows x `length` slots, and calls of up to
    `rows + chunk` tokens (every decoding row plus a chunk of prompts)."""

    def __init__(self, decoder, rows: int, length: int, chunk: int = 256):
        self.decoder, self.rows, self.length = decoder, rows, length
        self.cache = decoder.new_cache(rows, length, width=rows + chunk)

    def run(self, ids: list[int], rows: list[int], slots: list[int], want: list[int]) -> torch.Tensor:
        # raw: bf16 logits stay bf16; greedy rows need only their argmax, the others widen their own row
        return self.decoder.step_rows(ids, rows, slots, self.cache, want, raw=True)

    def release(self, row: int) -> None:
        pass  # the next sequence overwrites the slots it attends to


class HFRunner:
    """Any other transformers causal LM: each sequence keeps its own transformers cache and runs alone. Correct
    for every architecture transformers runs, without the batched step's speed."""

    def __init__(self, model, rows: int, length: int):
        self.model, self.rows, self.length = model, rows, length
        self.past: list = [None] * rows

    @torch.inference_mode()
    def run(self, ids: list[int], rows: list[int], slots: list[int], want: list[int]) -> torch.Tensor:
        """`DecoderRunner.run`'s contract; `want` ascending, as the engine builds it."""
        logits, at, wanted = [], 0, set(want)
        while at < len(ids):   # one forward per run of consecutive slots of one row
            end = at + 1
            while end < len(ids) and rows[end] == rows[at] and slots[end] == slots[end - 1] + 1:
                end += 1
            row = rows[at]
            out = self.model(input_ids=torch.tensor([ids[at:end]]), past_key_values=self.past[row] if slots[at]
                             else None, use_cache=True)
            self.past[row] = out.past_key_values
            logits.append(out.logits[0, [i - at for i in range(at, end) if i in wanted]].float())
            at = end
        return torch.cat(logits)

    def release(self, row: int) -> None:
        self.past[row] = None
