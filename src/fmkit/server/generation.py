"""/v1/chat/completions and /v1/completions: a checked request becomes sequences for the model's engine, and the
engine's progress becomes OpenAI responses, whole or as server-sent-event chunks."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time

from starlette.responses import StreamingResponse

from . import protocol as P
from .engine import PromptTooLong, QueueFull, Sequence
from .tools import as_call, call_schema, parse_calls, partial_call, supports_tools


class Job:
    """A request's sequences in an engine, and an event the engine thread sets whenever one of them moves."""

    def __init__(self, served, seqs: list[Sequence], param: str):
        self.served, self.seqs = served, seqs
        self.event, self.finished, self.asked = asyncio.Event(), asyncio.Event(), time.monotonic()
        self.interval, self.sent = 0.0, 0.0   # streams: the least time between chunks (set by the app)
        loop = asyncio.get_running_loop()
        moved = self._moved   # one callable for all its sequences: the engine hands over each once per round
        for s in seqs:
            s.notify = moved
        served.engine.deliver = lambda notes: loop.call_soon_threadsafe(_run_all, notes)
        try:
            served.engine.submit(seqs)
        except QueueFull as e:
            raise P.APIError(429, f"{e}; retry shortly", None, "queue_full", "rate_limit_exceeded",
                             {"Retry-After": "1"}) from None
        except PromptTooLong as e:
            raise P.invalid(str(e), param, "context_length_exceeded") from None

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)

    async def wait(self, request) -> bool:
        """Wait for progress; False when the client has gone (its sequences are then cancelled). Whether it has
        gone is asked at most once a second, however often tokens arrive."""
        try:
            await asyncio.wait_for(self.event.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
        self.event.clear()
        now = time.monotonic()
        if now - self.asked >= 1.0:
            self.asked = now
            if await request.is_disconnected():
                self.cancel()
                return False
        return True

    async def paced(self, request) -> bool:
        """`wait`, then for streams at most one chunk per `interval` seconds: the tokens of a faster stream
        arrive several to a chunk, which costs the server and the client a fraction of one chunk per token. The
        end is not held back: a job that finishes meanwhile goes on at once (a client sends its next request
        only when it has seen the end)."""
        if not await self.wait(request):
            return False
        rest = self.sent + self.interval - time.monotonic()
        if rest > 0 and not self.done:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.finished.wait(), rest)
        self.sent = time.monotonic()
        return True

    def _moved(self) -> None:
        """A note from the engine (run on the event loop): progress, and perhaps the end."""
        self.event.set()
        if self.done:
            self.finished.set()

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancelled = True

    def check(self) -> None:
        failed = [s for s in self.seqs if s.finish_reason == "error"]
        if failed:
            raise P.APIError(500, f"the model failed on this request ({failed[0].error})", None, "model_error",
                             "server_error")

    def usage(self, prompt_tokens: int) -> dict:
        done = sum(len(s.tokens) for s in self.seqs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


_IDS = random.Random()   # the server's own: no caller's random.seed() makes ids repeat


def _token() -> str:
    """24 random hex digits for a response id: uuid4 reads the OS's random source, a call that lets go of the
    interpreter lock, and under load the event loop then waited ~0.3 ms for the compute thread to hand it back."""
    return f"{_IDS.getrandbits(96):024x}"


def _run_all(notes) -> None:
    for note in notes:
        note()


def _guide(served, schema):
    from .constrain import JsonConstraint, TokenGuide

    if served.pieces is None:   # once per model, on its first JSON request
        served.pieces = [served.tok.decode([i]) for i in range(len(served.tok))]
    try:
        constraint = JsonConstraint(None if schema is True else schema)
    except ValueError as e:
        raise P.invalid(f"response_format: {e}", "response_format") from None
    return TokenGuide(constraint, served.pieces, served.tok.eos_token_id)


def _entry(tok, token: int, logprob: float, top: list) -> dict:
    piece = tok.decode([token])
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
            "top_logprobs": [{"token": (p := tok.decode([t])), "logprob": lp, "bytes": list(p.encode())}
                             for t, lp in top]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Last(str):
    """A stream's last write: `EventStream` ends the response body with it, in the same send."""


class EventStream(StreamingResponse):
    """A server-sent-event response whose `Last` write also ends the chunked body. Starlette sends the end in a
    write of its own, and each write is a system call and a wake-up of the client."""

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for chunk in self.body_iterator:
            ended = isinstance(chunk, Last)
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---- output policy ---------------------------------------------------------------------------------------------
def _screens(policy, seqs: list[Sequence], logprobs: bool) -> dict:
    """{choice index: its Screen} under the request's output policy ({} without one)."""
    if policy is None:
        return {}
    if logprobs and policy.changes_text:   # token pieces would show what the policy took out
        actions = ", ".join(sorted(policy.actions))
        raise P.invalid(f"logprobs cannot be combined with this server's output policy ({actions}), which changes "
                        "the text", "logprobs", "unsupported_value")
    return {s.index: policy.screen() for s in seqs}


def _stop_if_blocked(s: Sequence, screen, text: str, done: bool) -> None:
    """Cancel a sequence as soon as its policy blocks its text, rather than generate what nobody will see."""
    if screen is not None and screen.blocks(text, done):
        s.cancelled = True


def _watch(job: Job, ctx: dict) -> None:
    for s in job.seqs:
        done = s.finished   # read before the text: the engine writes the final text, then the reason
        _stop_if_blocked(s, ctx["screens"].get(s.index), s.text, done)


def _shown(s: Sequence, screen, done: bool) -> str:
    """What a stream may show of a sequence's text now (`done`: it had finished when this round began): all of
    it, or what its screen lets through."""
    text = s.text if done else s.visible
    if screen is None:
        return text
    _stop_if_blocked(s, screen, text, done)
    return screen.stream(text, done)


def _end(s: Sequence, screen, done: bool, reason: str | None = None) -> dict:
    """A choice's finish_reason once it has finished, and under a policy its content_filter_results."""
    if not done:
        return {"finish_reason": None}
    reason = reason or s.finish_reason
    if screen is None:
        return {"finish_reason": reason}
    return {"finish_reason": screen.reason(reason), "content_filter_results": screen.results()}


def _screened(message: dict, screen) -> dict:
    """A whole chat message under the screen: its content redacted (tool calls are left as the model wrote them),
    or nothing at all when blocked."""
    if screen is None:
        return message
    content = screen.whole(message["content"] or "")
    if screen.blocked:
        return {"role": "assistant", "content": "", "refusal": None}
    return message if message["content"] is None else {**message, "content": content}


def encoded(served, text: str, param: str) -> list[int]:
    try:
        return served.engine.encode(text)
    except PromptTooLong as e:
        raise P.invalid(str(e), param, "context_length_exceeded") from None


# ---- chat ------------------------------------------------------------------------------------------------------
def chat_job(served, body: dict, policy=None):
    """Check a chat request and start it under its output policy; returns (job, context for the response)."""
    P.known_fields(body, P.CHAT_FIELDS)
    messages = P.messages(body)
    stream, include_usage = P.streaming(body)
    n = P.get(body, "n", (int,), 1, 1, P.MAX_N)
    limit = P.get(body, "max_completion_tokens", (int,), None, 1)
    limit = limit if limit is not None else P.get(body, "max_tokens", (int,), None, 1)
    logprobs = P.get(body, "logprobs", (bool,), False)
    top = P.get(body, "top_logprobs", (int,), None, 0, 20)
    if top is not None and not logprobs:
        raise P.invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    fmt = P.response_format(body)
    tools, choice = P.tools(body)
    if fmt is not None and choice not in ("none", "auto"):
        raise P.invalid("response_format cannot be combined with a forced tool_choice", "response_format")
    tok = served.tok
    if not served.template:
        raise P.invalid(f"model {served.name} has no chat template; use /v1/completions with a plain prompt",
                        "messages", "no_chat_template")
    use_tools = tools and choice != "none"
    if use_tools and choice == "auto" and not supports_tools(tok.chat_template):
        raise P.invalid(f"model {served.name}'s chat template does not render tools; force a call with "
                        "tool_choice (required or a function) or drop 'tools'", "tools", "tools_not_supported")
    try:
        text = tok.apply_chat_template(messages, tools=tools if use_tools and supports_tools(tok.chat_template)
                                       else None, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own checks (alternating roles, ...) are the user's to fix
        raise P.invalid(f"the chat template rejected these messages: {str(e).splitlines()[0][:300]}",
                        "messages", "invalid_messages") from None
    prompt = encoded(served, text, "messages")
    room = served.context - len(prompt)
    max_tokens = limit if limit is not None else max(room, 1)
    params = P.params(body, len(tok), max_tokens, (top or 0) if logprobs else None)
    forced = use_tools and choice != "auto"
    if fmt is not None or forced:
        params.guide = _guide(served, call_schema(tools, choice) if forced else fmt)
    seqs = [Sequence(prompt, dataclasses.replace(params), i) for i in range(n)]
    ctx = dict(stream=stream, include_usage=include_usage, prompt_tokens=len(prompt), forced=forced,
               tools={t["function"]["name"] for t in tools} if use_tools and choice == "auto" else set(),
               screens=_screens(policy, seqs, logprobs))
    return Job(served, seqs, "messages"), ctx


def _message(seq: Sequence, ctx: dict) -> tuple[dict, str]:
    """The assistant message and finish reason for a finished sequence (tool calls parsed or forced)."""
    reason = seq.finish_reason
    if ctx["forced"]:
        try:
            call = as_call(json.loads(seq.text))
            return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}, \
                "tool_calls" if reason == "stop" else reason
        except (ValueError, KeyError, TypeError):   # ran out of tokens mid-call: what there is of it
            call = partial_call(seq.text)
            return {"role": "assistant", "content": None, "refusal": None,
                    **({"tool_calls": [call]} if call else {})}, reason
    if ctx["tools"]:
        content, calls = parse_calls(seq.text, ctx["tools"])
        if calls:
            return {"role": "assistant", "content": content or None, "refusal": None, "tool_calls": calls}, \
                "tool_calls"
    return {"role": "assistant", "content": seq.text, "refusal": None}, reason


async def chat_response(job: Job, ctx: dict, request, model: str) -> dict | None:
    while not job.done:
        if not await job.wait(request):
            return None
        _watch(job, ctx)
    job.check()
    tok = job.served.tok
    choices = []
    for s in job.seqs:
        message, reason = _message(s, ctx)
        screen = ctx["screens"].get(s.index)
        message = _screened(message, screen)
        lp = {"content": [_entry(tok, *e) for e in s.logprobs], "refusal": None} \
            if s.params.logprobs is not None else None
        choices.append({"index": s.index, "message": message, "logprobs": lp, **_end(s, screen, True, reason)})
    return {"id": f"chatcmpl-{_token()}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": job.served.fingerprint, "choices": choices,
            "usage": job.usage(ctx["prompt_tokens"])}


async def chat_stream(job: Job, ctx: dict, request, model: str):
    """SSE chunks: the role first, then content deltas, then each choice's finish_reason, then (with
    include_usage) one chunk with empty choices and the usage, then [DONE]. Replies that may turn into tool
    calls are sent whole at the end."""
    head = {"id": f"chatcmpl-{_token()}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "system_fingerprint": job.served.fingerprint}
    tok, hold = job.served.tok, bool(ctx["forced"] or ctx["tools"])

    def chunks(s: Sequence, mark: list, done: bool):
        screen = ctx["screens"].get(s.index)
        if hold and not done:
            _stop_if_blocked(s, screen, s.text, done)
            return
        text = "" if hold else _shown(s, screen, done)
        new_lp = s.logprobs[mark[1]:]
        delta, reason = {}, None
        if done and hold:
            message, reason = _message(s, ctx)
            message = _screened(message, screen)
            delta = {k: v for k, v in message.items() if k in ("content", "tool_calls") and v}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{**c, "index": i} for i, c in enumerate(delta["tool_calls"])]
        if not hold and len(text) > mark[0]:
            delta["content"] = text[mark[0]:]
        if delta or new_lp:
            lp = {"content": [_entry(tok, *e) for e in new_lp], "refusal": None} \
                if s.params.logprobs is not None and new_lp else None
            yield {**head, "choices": [{"index": s.index, "delta": delta, "logprobs": lp, "finish_reason": None}]}
        mark[0], mark[1] = max(mark[0], len(text)), mark[1] + len(new_lp)
        if done:
            yield {**head, "choices": [{"index": s.index, "delta": {}, "logprobs": None,
                                        **_end(s, screen, True, reason)}]}

    first = [{**head, "choices": [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]} for s in job.seqs]
    async for line in _stream(job, ctx, request, head, chunks, first):
        yield line


async def _stream(job: Job, ctx: dict, request, head: dict, chunks, first=()):
    """What both endpoints' streams share: until every sequence has finished, the chunks `chunks(seq, mark, done)`
    makes from a sequence's progress (mark: [characters sent, logprob entries sent]), at most one round per stream
    interval, `first` going out with the first round that has any; a sequence that failed gets an error event;
    then the usage chunk (with include_usage, when every other chunk carries "usage": null) and [DONE], in the
    `Last` write.

    The engine thread may finish a sequence between any two reads made here, so each round reads its finish
    reason once, before its text, and decides everything from that: reading it twice once sent a finish chunk
    without the text that came with it."""
    usage = {"usage": None} if ctx["include_usage"] else {}
    marks = {s.index: [0, 0] for s in job.seqs}
    open_ = list(job.seqs)
    try:
        held = [_sse({**chunk, **usage}) for chunk in first]   # sent with the first text, not before it
        while open_:
            events = []   # one write per round: each is a send and a wake-up of the client
            for s in list(open_):
                reason = s.finish_reason
                if reason == "error":
                    events.append(_sse({"error": {"message": f"the model failed on this request ({s.error})",
                                                  "type": "server_error", "param": None, "code": "model_error"}}))
                else:
                    events += [_sse({**chunk, **usage}) for chunk in chunks(s, marks[s.index], reason is not None)]
                if reason is not None:
                    open_.remove(s)
            if not open_:
                if ctx["include_usage"]:
                    events.append(_sse({**head, "choices": [], "usage": job.usage(ctx["prompt_tokens"])}))
                events.append("data: [DONE]\n\n")
                yield Last("".join(held + events))
                return
            if events:
                yield "".join(held + events)
                held = []
            if not await job.paced(request):
                return
    finally:
        job.cancel()   # a client that went away frees its rows; finished sequences ignore this


# ---- completions -----------------------------------------------------------------------------------------------
def completion_job(served, body: dict, policy=None):
    P.known_fields(body, P.COMPLETION_FIELDS)
    tok = served.tok
    prompts = P.completion_prompts(body, len(tok))
    stream, include_usage = P.streaming(body)
    n = P.get(body, "n", (int,), 1, 1, P.MAX_N)
    best_of = P.get(body, "best_of", (int,), n, 1, P.MAX_N)
    if best_of != n:
        raise P.invalid("best_of other than n is not supported", "best_of", "unsupported_value")
    if P.get(body, "suffix", (str,), None):
        raise P.invalid("suffix (insertion) is not supported", "suffix", "unsupported_value")
    echo = P.get(body, "echo", (bool,), False)
    logprobs = P.get(body, "logprobs", (int,), None, 0, 5)
    if echo and stream:
        raise P.invalid("echo is not supported with stream", "echo", "unsupported_value")
    limit = P.get(body, "max_tokens", (int,), None, 0)
    max_tokens = 16 if limit is None else limit
    if max_tokens == 0 and not echo:
        raise P.invalid("max_tokens 0 is only allowed with echo (to score the prompt)", "max_tokens")
    params = P.params(body, len(tok), max_tokens, logprobs)
    if echo and logprobs is not None:
        params.prompt_logprobs = logprobs
    ids = [p if isinstance(p, list) else encoded(served, p, "prompt") for p in prompts]
    if not all(ids):
        raise P.invalid("'prompt' must not be empty", "prompt", "empty_prompt")
    seqs = [Sequence(i, dataclasses.replace(params), k * n + j) for k, i in enumerate(ids) for j in range(n)]
    ctx = dict(stream=stream, include_usage=include_usage, prompt_tokens=sum(map(len, ids)), echo=echo,
               texts=[p if isinstance(p, str) else tok.decode(p) for p in prompts], n=n,
               screens=_screens(policy, seqs, logprobs is not None))
    return Job(served, seqs, "prompt"), ctx


def _completion_logprobs(tok, s: Sequence, echo: bool, k: int | None) -> dict | None:
    if k is None:
        return None
    entries = []
    if echo:
        entries += [(s.prompt[0], None, [])] + list(s.prompt_logprobs[1:] if s.prompt_logprobs else [])
    entries += s.logprobs
    ids = [e[0] for e in entries]
    pieces = [tok.decode([t]) for t in ids]
    start = 0 if echo else len(tok.decode(s.prompt))
    offsets = [start + len(tok.decode(ids[:i])) for i in range(len(ids))]   # exact even inside UTF-8 pieces
    return {"tokens": pieces, "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [None if e[1] is None else {tok.decode([t]): lp for t, lp in e[2]} for e in entries],
            "text_offset": offsets}


async def completion_response(job: Job, ctx: dict, request, model: str) -> dict | None:
    while not job.done:
        if not await job.wait(request):
            return None
        _watch(job, ctx)
    job.check()
    tok, choices = job.served.tok, []
    for s in job.seqs:
        text = (ctx["texts"][s.index // ctx["n"]] if ctx["echo"] else "") + s.text
        screen = ctx["screens"].get(s.index)   # echoed prompts leave the server too, so they are screened
        choices.append({"index": s.index, "text": screen.whole(text) if screen else text, **_end(s, screen, True),
                        "logprobs": _completion_logprobs(tok, s, ctx["echo"], s.params.logprobs)})
    return {"id": f"cmpl-{_token()}", "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": job.served.fingerprint, "choices": choices,
            "usage": job.usage(ctx["prompt_tokens"])}


async def completion_stream(job: Job, ctx: dict, request, model: str):
    head = {"id": f"cmpl-{_token()}", "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": job.served.fingerprint}
    tok = job.served.tok

    def chunks(s: Sequence, mark: list, done: bool):
        screen = ctx["screens"].get(s.index)
        text = _shown(s, screen, done)
        new_lp = s.logprobs[mark[1]:]
        if len(text) > mark[0] or new_lp or done:
            lp = None
            if s.params.logprobs is not None and new_lp:
                lp = {"tokens": [tok.decode([e[0]]) for e in new_lp], "token_logprobs": [e[1] for e in new_lp],
                      "top_logprobs": [{tok.decode([t]): v for t, v in e[2]} for e in new_lp],
                      "text_offset": [mark[0]] * len(new_lp)}
            yield {**head, "choices": [{"index": s.index, "text": text[mark[0]:], "logprobs": lp,
                                        **_end(s, screen, done)}]}
        mark[0], mark[1] = max(mark[0], len(text)), mark[1] + len(new_lp)

    async for line in _stream(job, ctx, request, head, chunks):
        yield line
