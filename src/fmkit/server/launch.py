"""`fmkit serve`: the OpenAI-compatible server, started from the command line or from Python."""
from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Literal

from ..errors import FmkitError
from ..progress import console


def _need_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise FmkitError("fmkit serve needs FastAPI and uvicorn: pip install 'fmkit[serve]'") from None


def build(models: list[str] | None = None, names: dict | None = None, models_dir: str | None = None,
          api_key: str | None = None, api_keys: str | None = None, dtype: str = "auto", max_batch: int = 32,
          kv_cache_mb: int = 0, memory_mb: float = 0, keep_alive: str = "30m", max_queue: int = 256,
          max_body_mb: float = 8, stream_interval_ms: float = 50, trust_pickle: bool = False,
          workspace: str | Path | None = None, max_jobs: int = 1, max_file_mb: float = 512,
          output_policy: str = "", model_policy: dict | None = None, moderation_model: str | None = None):
    """The ASGI app with its pool (models are loaded on first use). What `serve` runs and tests start."""
    _need_packages()
    from ..models.reference import resolve
    from .app import create_app
    from .keys import Keys, read_keys
    from .pool import MINILM, Pool, parse_keep_alive

    refs = {}
    for spec in models or []:
        ref = None if spec == MINILM else resolve(spec, None, workspace)
        label = spec if ref is None else ref.name if ref.kind == "hf" else ref.label   # hub ids as ORG/NAME
        if label in refs:
            raise FmkitError(f"two models would be served as '{label}'; name one with --name NAME=REF")
        refs[label] = spec
    for label, spec in (names or {}).items():
        if isinstance(spec, list):
            raise FmkitError(f"--name {label}= is given twice")
        refs[label] = spec
    if not refs and not models_dir:
        raise FmkitError("nothing to serve: give model references (folders, adapters, hf:ORG/NAME), --name "
                         "NAME=REF or --models-dir DIR")
    if models_dir and not Path(models_dir).expanduser().is_dir():
        raise FmkitError(f"--models-dir {models_dir} is not a folder")
    for value, flag in ((max_batch, "--max-batch"), (max_queue, "--max-queue"), (max_jobs, "--max-jobs")):
        if value < 1:
            raise FmkitError(f"{flag} must be at least 1, got {value}")
    try:
        alive = parse_keep_alive(keep_alive, 1800.0)
    except ValueError as e:
        raise FmkitError(f"--keep-alive: {e}") from None
    if stream_interval_ms < 0:
        raise FmkitError(f"--stream-interval-ms must be 0 or more, got {stream_interval_ms}")
    # streams look for news at most once per interval, so the engines need not hand it over more often
    pool = Pool(refs, models_dir, dtype, max_batch, kv_cache_mb, memory_mb, alive, max_queue,
                trust_pickle=trust_pickle, workspace=workspace, notify_every=stream_interval_ms / 1000)
    from .moderation import Classifier, Moderator
    from .policy import policies_of

    moderator = Moderator(Classifier(moderation_model, workspace) if moderation_model else None)
    policies = policies_of(output_policy, model_policy, moderator, None if models_dir else set(refs))
    return create_app(pool, Keys(read_keys(api_key, api_keys)), int(max_body_mb * (1 << 20)),
                      stream_interval_ms / 1000, workspace, max_jobs, int(max_file_mb * (1 << 20)),
                      policies=policies, moderator=moderator)


def serve(models: list[str] | None = None, names: dict | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, api_keys: str | None = None, models_dir: str | None = None,
          dtype: Literal["auto", "fp32", "bf16"] = "auto", max_batch: int = 32, kv_cache_mb: int | None = None,
          memory_mb: float | None = None, keep_alive: str = "30m", max_queue: int = 256, max_body_mb: float = 8,
          stream_interval_ms: float = 50, trust_pickle: bool = False, workspace: str | Path | None = None,
          max_jobs: int = 1, max_file_mb: float = 512, output_policy: str = "", model_policy: dict | None = None,
          moderation_model: str | None = None) -> dict:
    """Serve models over the OpenAI API (chat, completions, embeddings, streaming) with continuous batching.

    Code written for OpenAI runs against it by changing base_url (`OpenAI(base_url="http://HOST:PORT/v1")`),
    including files and fine-tuning jobs: uploads and jobs are kept in the workspace's platform/ folder, jobs run in
    worker processes and survive restarts, and a finished job's ft: model is servable at once.
    Each model is loaded on its first request and kept for --keep-alive after its last; the least recently used
    idle ones are unloaded when memory runs short. GET /v1/models lists what is served, /health says ready,
    /metrics is Prometheus text. Ctrl-C (or SIGTERM) finishes the requests in flight, then stops.

    Args:
        models: Model references to serve (folders, adapters, hf:ORG/NAME, minilm for the packaged encoder),
            each under its folder's name.
        names: Serve a reference under a name of your choosing, NAME=REF.
        host: Address to listen on (0.0.0.0 for every interface).
        port: Port to listen on.
        api_key: Require this bearer key on every /v1 request.
        api_keys: File of keys, one per line, each optionally with limits: KEY rpm=N tpm=N name=NAME.
        models_dir: Also serve every model or adapter folder in this folder, under its folder name.
        dtype: auto (bf16 where this CPU has bf16 instructions, else fp32), fp32 (exact) or bf16.
        max_batch: Most sequences decoded together per model (KV cache rows).
        kv_cache_mb: KV cache memory per model in MiB (default: up to a fifth of free memory).
        memory_mb: Memory budget for loaded models in MiB (default: three quarters of free memory).
        keep_alive: How long an idle model stays loaded: seconds or 30s, 5m, 1h; -1 for ever.
        max_queue: Sequences that may wait per model before requests get 429.
        max_body_mb: Largest request body in MiB (larger: 413).
        stream_interval_ms: Least time between two chunks of one stream; tokens that come faster are sent
            together (0: one chunk per token).
        trust_pickle: Allow pickle weights (loading them can run code).
        workspace: Workspace folder where bare model names are looked up, and uploads and fine-tuning jobs kept
            (default $FMKIT_WORKSPACE or ./fmkit-workspace).
        max_jobs: Fine-tuning jobs that train at once (each in its own process); the rest wait in the queue.
        max_file_mb: Largest uploaded file in MiB (larger: 413).
        output_policy: What every response's text gets, comma-separated: redact-pii (placeholders for emails,
            phones, cards, keys, ...), flag-toxic (say so in content_filter_results), block-toxic (stop there,
            finish_reason content_filter). Default: nothing.
        model_policy: Output policy actions for one model's responses, NAME=ACTIONS (added to --output-policy and
            a key's policy=).
        moderation_model: Text classifier from fmkit classify whose labels are moderation categories; its
            probabilities join the lexicon's in /v1/moderations.
    """
    import uvicorn

    app = build(models, names, models_dir, api_key, api_keys, dtype, max_batch, kv_cache_mb, memory_mb,
                keep_alive, max_queue, max_body_mb, stream_interval_ms, trust_pickle, workspace, max_jobs, max_file_mb,
                output_policy=output_policy, model_policy=model_policy, moderation_model=moderation_model)
    served = app.state.pool.names()
    sock = _listening(host, port)   # before saying so: a port in use is an error, not a "serving" line
    console.print(f"serving {', '.join(served) or 'the models in ' + str(models_dir)} on http://{host}:{port}/v1 "
         f"({'keys required' if api_key or api_keys else 'no API key'})")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    return {"served": served, "url": f"http://{host}:{port}/v1"}


def _listening(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or a FmkitError saying why it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise FmkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class Background:
    """A server on a free local port in a thread of this process, for tests and notebooks:
    `with Background(models=[...]) as url: OpenAI(base_url=url, api_key="none")`."""

    def __init__(self, **kw):
        import uvicorn

        self.app = build(**kw)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=30))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> str:
        import time

        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self.url
            time.sleep(0.02)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
