"""The HTTP application: OpenAI's routes over the pool of models, API keys, limits and metrics.

Bodies are read and checked here rather than by FastAPI's models, so that every mistake comes back in OpenAI's
error envelope with the field named, and a body over the size limit is refused while it is read (413), not after.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import FmkitError
from . import generation as G
from . import moderation as M
from . import protocol as P
from .embed import embeddings
from .keys import Keys
from .metrics import BATCH_BUCKETS, Metrics
from .policy import Policies
from .policy import count as count_policy


def create_app(pool, keys: Keys, max_body: int = 8 << 20, stream_interval: float = 0.0, workspace=None,
               max_jobs: int = 1, max_file: int = 512 << 20, policies: Policies | None = None,
               moderator: M.Moderator | None = None) -> FastAPI:
    from . import files, jobs
    from .jobqueue import Platform

    metrics = Metrics()
    moderator = moderator or M.Moderator()
    policies = policies or Policies(moderator=moderator)
    state = {"ready": False}
    platform = Platform(pool, workspace, max_jobs)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def sweep():
            while True:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(pool.sweep)
        task = asyncio.create_task(sweep())
        await asyncio.to_thread(platform.start)
        state["ready"] = True
        yield
        state["ready"] = False
        task.cancel()
        await asyncio.to_thread(platform.close)   # workers checkpoint; their jobs wait for the next start
        await asyncio.to_thread(pool.close)   # after uvicorn has let in-flight requests finish

    app = FastAPI(title="fmkit serve", lifespan=lifespan, docs_url=None, redoc_url=None)   # their pages need a CDN
    app.state.pool, app.state.metrics, app.state.platform = pool, metrics, platform
    _declare(metrics, pool, platform)

    def observe(event: str, value, model: str) -> None:
        if event == "batch":
            metrics.observe("fmkit_batch_size", value, model=model)
        elif event == "finished" and value.finish_reason in ("stop", "length") and value.t_first:
            metrics.observe("fmkit_time_to_first_token_seconds", value.t_first - value.t_submit, model=model)
            metrics.inc("fmkit_completion_tokens_total", len(value.tokens), model=model)
        elif event in ("loaded", "unloaded"):
            metrics.inc(f"fmkit_model_{event}_total", model=model)
    pool.observe = observe

    def fail(e: P.APIError) -> JSONResponse:
        metrics.inc("fmkit_errors_total", code=e.code or str(e.status))
        return JSONResponse(e.body(), e.status, headers=e.headers)

    async def guard(scope, receive, send, inner):
        """Size limit, keys and rate limits before any route, and request metrics after. A plain ASGI wrapper
        (not Starlette's BaseHTTPMiddleware), so a route still sees its client disconnect."""
        start, path, status = time.monotonic(), scope["path"], [500]   # 500 until a response starts
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            try:
                await admit(scope, receive, path, headers)
            except P.APIError as e:
                return await fail(e)(scope, receive, sending)
            await inner(scope, receive, sending)
        finally:
            if path.startswith("/v1/"):
                route = route_of(scope)
                metrics.inc("fmkit_requests_total", endpoint=route, status=status[0])
                metrics.observe("fmkit_request_latency_seconds", time.monotonic() - start, endpoint=route)

    async def admit(scope, receive, path: str, headers: dict) -> None:
        """The checks before any route: the body's declared size, the key, the key's rate."""
        length = headers.get("content-length", "")
        limit = max_file + (1 << 20) if path == "/v1/files" else max_body   # uploads: the file and its form
        if length.isdigit() and int(length) > limit:
            if int(length) <= 8 * max_body:   # read it away, so the client sees the answer, not a broken pipe
                while (await receive()).get("more_body"):
                    pass
            raise P.APIError(413, f"request body of {int(length)} bytes is over this server's limit of "
                                  f"{limit} bytes", None, "request_too_large")
        if path.startswith("/v1/") and keys.required:
            sent = headers.get("authorization")
            key = keys.find(sent)
            if key is None:
                raise P.APIError(401, "Incorrect API key provided." if sent else "You didn't provide an API key. "
                                 "Pass it as 'Authorization: Bearer KEY'.", None, "invalid_api_key")
            wait = keys.admit(key)
            if wait > 0:
                raise P.APIError(429, f"rate limit reached for key {key.name}; retry in {math.ceil(wait)} s",
                                 None, "rate_limit_exceeded", "requests", {"Retry-After": str(math.ceil(wait))})
            scope.setdefault("state", {})["key"] = key

    def route_of(scope) -> str:
        """The route's template (`/v1/models/{name:path}`), or `unmatched`: one series per route, whatever paths are
        sent, so that no client can grow /metrics without bound."""
        route = scope.get("route")
        if route is None:   # refused before routing (413, 401, 429)
            route = next((r for r in app.router.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, e: P.APIError):
        return fail(e)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):   # a bug: the envelope for the client, the log for us
        return fail(P.APIError(500, f"The server had an error while processing your request ({type(e).__name__})",
                               None, "internal_error", "server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):   # unknown routes, wrong methods
        what = {404: f"no such route: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return fail(P.APIError(e.status_code, what, None, {404: "unknown_url", 405: "method_not_allowed"}.get(
            e.status_code, str(e.status_code))))

    async def body_of(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise P.APIError(413, f"request body is over this server's limit of {max_body} bytes", None,
                                 "request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks) or b"null"
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise P.APIError(400, f"We could not parse the JSON body of your request ({e})", None,
                             "invalid_json") from None
        except RecursionError:
            raise P.APIError(400, "We could not parse the JSON body of your request: it is nested too deeply",
                             None, "invalid_json") from None
        if not isinstance(body, dict):
            raise P.APIError(400, "the request body must be a JSON object", None, "invalid_json")
        if b"\\u" in raw:   # only an escape can make a lone surrogate, which no tokenizer or encoder takes
            P.no_lone_surrogates(body)
        return body

    platform.body_of = body_of

    async def model_of(request: Request, body: dict, want: str):
        name = P.get(body, "model", (str,), P.REQUIRED)
        try:
            if not platform.visible(name, *platform.tenant(request)):
                raise KeyError(name)   # another tenant's fine-tuned model reads as if it did not exist
            keep = body.get("keep_alive")
            if keep is not None:
                from .pool import parse_keep_alive
                try:
                    parse_keep_alive(keep, 0)
                except ValueError as e:
                    raise P.invalid(str(e), "keep_alive") from None
            served = pool.get_loaded(name, keep) or await asyncio.to_thread(pool.get, name, keep)
        except KeyError:
            raise P.APIError(404, f"The model '{name}' does not exist; this server serves: "
                                  f"{', '.join(pool.names()) or 'nothing'}", "model", "model_not_found") from None
        except FmkitError as e:
            raise P.APIError(500, f"model {name} could not be loaded: {e}", "model", "model_load_failed",
                             "server_error") from None
        if want == "generate" and served.kind != "generate":
            pool.done(served)
            raise P.invalid(f"model {name} is an encoder: it serves /v1/embeddings only", "model",
                            "model_not_supported")
        return name, served

    async def generate(request: Request, start_job, whole, stream):
        body = await body_of(request)
        name, served = await model_of(request, body, "generate")
        key = getattr(request.state, "key", None)
        try:
            job, ctx = start_job(served, body, policies.of(name, key))
            job.interval = stream_interval
        except BaseException:
            pool.done(served)
            raise
        metrics.inc("fmkit_prompt_tokens_total", ctx["prompt_tokens"], model=name)

        def finish():
            pool.done(served)
            count_policy(metrics, name, ctx["screens"].values())
            if key is not None:
                keys.spend(key, job.usage(ctx["prompt_tokens"])["total_tokens"])

        if ctx["stream"]:
            async def chunks():
                try:
                    async for chunk in stream(job, ctx, request, name):
                        yield chunk
                finally:
                    finish()
            return G.EventStream(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            result = await whole(job, ctx, request, name)
        finally:
            job.cancel()
            finish()
        return JSONResponse(result if result is not None else {}, 200 if result is not None else 499)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, G.chat_job, G.chat_response, G.chat_stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, G.completion_job, G.completion_response, G.completion_stream)

    @app.post("/v1/embeddings")
    async def embeddings_route(request: Request):
        body = await body_of(request)
        name, served = await model_of(request, body, "embed")
        try:
            data, tokens = await asyncio.to_thread(embeddings, served, body)
        finally:
            pool.done(served)
        metrics.inc("fmkit_prompt_tokens_total", tokens, model=name)
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        body = await body_of(request)
        result = await asyncio.to_thread(M.moderations, moderator, body, pool.compute.run)
        for r in result["results"]:
            for category in (c for c, flagged in r["categories"].items() if flagged):
                metrics.inc("fmkit_moderation_flagged_total", category=category)
        return result

    def card(name: str) -> dict:
        served = pool.loaded.get(name)
        return {"id": name, "object": "model", "created": pool.created(name), "owned_by": "fmkit",
                **({"context_length": served.context, "system_fingerprint": served.fingerprint} if served else {})}

    def listed(request: Request) -> list[str]:
        return pool.names() + platform.models(*platform.tenant(request))

    def known(request: Request, name: str) -> str:
        if name not in listed(request):
            raise P.APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return name

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [card(n) for n in listed(request)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        return card(known(request, name))

    @app.delete("/v1/models/{name:path}")
    async def delete_model(request: Request, name: str):
        """OpenAI's delete for fine-tuned models: this tenant's ft: models and checkpoints (403 for the others)."""
        if not name.startswith("ft:"):
            known(request, name)
            raise P.APIError(403, f"{name} is not a fine-tuned model; only ft: models can be deleted", "model",
                             "permission_denied")
        if not await asyncio.to_thread(platform.delete_model, name, *platform.tenant(request)):
            raise P.APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return {"id": name, "object": "model", "deleted": True}

    def admin_only(request: Request) -> None:
        if not platform.tenant(request)[1]:
            raise P.APIError(403, "loading and unloading models needs an admin key", None, "permission_denied")

    @app.post("/v1/models/{name:path}/load")
    async def load_model(request: Request, name: str):
        """An fmkit extension (admin keys): load a model now rather than on its first request."""
        admin_only(request)
        try:
            served = await asyncio.to_thread(pool.get, known(request, name))
        except FmkitError as e:
            raise P.APIError(500, f"model {name} could not be loaded: {e}", "model", "model_load_failed",
                             "server_error") from None
        pool.done(served)
        return {**card(name), "loaded": True}

    @app.post("/v1/models/{name:path}/unload")
    async def unload_model(request: Request, name: str):
        """An fmkit extension (admin keys): unload a model now (409 while it is serving requests)."""
        admin_only(request)
        if not await asyncio.to_thread(pool.unload, known(request, name)):
            raise P.APIError(409, f"model {name} is serving requests; unload it when they have finished", "model",
                             "model_busy")
        return {**card(name), "loaded": False}

    files.add_routes(app, platform, max_file)
    jobs.add_routes(app, platform)

    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, 503)
        return {"status": "ready", "models": pool.names(), "loaded": list(pool.loaded)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    class Guarded:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            await guard(scope, receive, send, self.inner)

    app.add_middleware(Guarded)
    return app


def _declare(m: Metrics, pool, platform) -> None:
    m.counter("fmkit_requests_total", "HTTP requests by endpoint and status code")
    m.counter("fmkit_errors_total", "error responses by error code")
    m.counter("fmkit_prompt_tokens_total", "prompt tokens received, by model")
    m.counter("fmkit_completion_tokens_total", "tokens generated, by model")
    m.counter("fmkit_model_loaded_total", "model loads, by model")
    m.counter("fmkit_model_unloaded_total", "model unloads (keep-alive ran out or memory was needed), by model")
    m.counter("fmkit_pii_redactions_total", "PII redacted from outputs by the output policy, by model and type")
    m.counter("fmkit_flagged_responses_total", "responses whose text the output policy found toxic, by model")
    m.counter("fmkit_blocked_responses_total", "responses the output policy stopped (content_filter), by model")
    m.counter("fmkit_moderation_flagged_total", "/v1/moderations inputs flagged, by category")
    m.histogram("fmkit_request_latency_seconds", "time from request to the last byte of the response's head")
    m.histogram("fmkit_time_to_first_token_seconds", "time from a sequence's arrival to its first token")
    m.histogram("fmkit_batch_size", "sequences advanced together per decoding step", BATCH_BUCKETS)
    m.gauge("fmkit_queue_depth", "sequences waiting for a cache row, by model",
            lambda: {(("model", n),): len(s.engine.waiting) for n, s in list(pool.loaded.items()) if s.engine})
    m.gauge("fmkit_running_sequences", "sequences prefilling or decoding, by model",
            lambda: {(("model", n),): len(s.engine.prefilling) + len(s.engine.decoding)
                     for n, s in list(pool.loaded.items()) if s.engine})
    m.gauge("fmkit_loaded_models", "models loaded now", lambda: len(pool.loaded))
    m.gauge("fmkit_fine_tuning_jobs", "fine-tuning jobs by status", platform.counts)
