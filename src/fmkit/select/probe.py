"""One monitoring run's questions to the model: sampled outputs for every canary, and the log-probabilities of
fixed prompts where the API returns them, with what the API says about itself (`system_fingerprint`, the model
name it reports, response headers).

OpenAI-compatible endpoints (`openai:NAME`, an `fmkit serve` too) are asked through the SDK's raw responses, so
headers and fingerprints are kept; other references go through the `Model` interface and give text only (a local
model also gives each fixed text's whole log-likelihood).
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import FmkitError
from ..providers import GenRequest, get_model

TOP_LOGPROBS = 5
# headers that differ on every response say nothing about the model
VOLATILE = {"date", "content-length", "x-request-id", "openai-processing-ms", "cf-ray", "set-cookie",
            "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens", "req-cost-time", "server-timing"}


@dataclass
class Answers:
    """What one canary got in one run."""
    texts: list[str] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    tokens: int = 0                                  # completion tokens over all samples, as the API counts them
    logprobs: dict | None = None                     # {token: log-probability} of the fixed prompt, or None
    logprob_note: str = ""                           # why there are none


@dataclass
class Observed:
    """One run: the answers per canary, and the model's self-description."""
    answers: list[Answers]
    fingerprints: Counter = field(default_factory=Counter)
    served_as: Counter = field(default_factory=Counter)   # the `model` field of responses
    headers: dict = field(default_factory=dict)


def fixed_text(item) -> str:
    """The text whose log-probabilities are tracked: a text input and its reference (when it has one)."""
    return item.input + (item.reference or "") if isinstance(item.input, str) else ""


def seed_of(settings: dict, run: int, canary: int) -> int:
    """A seed per (run, canary): different in every run, the same when a run is repeated."""
    return (settings["seed"] * 1_000_003 + run * 7_919 + canary * 104_729) % (1 << 31)


def observe(ref: str, items: list, settings: dict, run: int, base_url: str = "", api_key: str = "",
            workspace=None) -> Observed:
    """Ask the model everything one run needs."""
    kw = {"base_url": base_url, "api_key": api_key, "concurrency": settings["concurrency"]} \
        if str(ref).split(":")[0] in ("openai", "anthropic") else {}
    model = get_model(ref, **kw)
    if getattr(model, "provider", "") == "openai":
        return _openai(model, items, settings, run)
    return _generic(model, items, settings, run)


def _openai(model, items: list, settings: dict, run: int) -> Observed:
    import openai

    client, name = model.client, model.model_name
    seen = Observed([Answers() for _ in items])
    endpoint = settings["endpoint"]

    def note(raw) -> object:
        resp = raw.parse()
        with model._lock:
            seen.fingerprints[resp.system_fingerprint or ""] += 1
            seen.served_as[resp.model or ""] += 1
            if not seen.headers:
                seen.headers = {k: v for k, v in raw.headers.items() if k.lower() not in VOLATILE}
        return resp

    def sample(i: int) -> None:
        item, a = items[i], seen.answers[i]
        common = dict(model=name, max_tokens=settings["max_tokens"], temperature=settings["temperature"],
                      n=settings["samples"], seed=seed_of(settings, run, i))
        if isinstance(item.input, str) and endpoint == "completions":
            resp = note(model._call(client.completions.with_raw_response.create, prompt=item.input, **common))
            a.texts = [c.text for c in resp.choices]
        else:
            msgs = item.input if isinstance(item.input, list) else [{"role": "user", "content": item.input}]
            resp = note(model._call(client.chat.completions.with_raw_response.create, messages=msgs, **common))
            a.texts = [c.message.content or "" for c in resp.choices]
        a.finish = [c.finish_reason or "" for c in resp.choices]
        a.tokens = resp.usage.completion_tokens if resp.usage else 0

    def probe(i: int) -> None:
        item, a = items[i], seen.answers[i]
        text = fixed_text(item)
        try:
            if text and endpoint == "completions":
                # the fixed text's own tokens, scored without generating (one greedy token, then cut off)
                resp = note(model._call(client.completions.with_raw_response.create, model=name, prompt=text,
                                        max_tokens=1, temperature=0, echo=True, logprobs=1))
                lp = resp.choices[0].logprobs
                a.logprobs = {f"{j}:{tok}": v for j, (tok, v, off) in enumerate(
                    zip(lp.tokens, lp.token_logprobs, lp.text_offset)) if v is not None and off < len(text)} \
                    if lp and lp.token_logprobs else None
            else:
                # chat APIs score no prompt: the first reply token's top alternatives, greedy, stand in for it
                msgs = item.input if isinstance(item.input, list) else [{"role": "user", "content": item.input}]
                resp = note(model._call(client.chat.completions.with_raw_response.create, model=name,
                                        messages=msgs, max_tokens=1, temperature=0, logprobs=True,
                                        top_logprobs=TOP_LOGPROBS))
                lp = resp.choices[0].logprobs
                first = lp.content[0].top_logprobs if lp and lp.content else []
                a.logprobs = {f"0:{t.token}": t.logprob for t in first} or None
        except openai.APIStatusError as e:   # an API without logprobs: the text tests still run
            a.logprob_note = f"{e.status_code}: {str(e)[:120]}"
            return
        except FmkitError as e:
            a.logprob_note = str(e)[:160]
            return
        if a.logprobs is None:
            a.logprob_note = "the response carried no log-probabilities"

    jobs = [(sample, i) for i in range(len(items))]
    if settings["logprobs"]:
        jobs += [(probe, i) for i in range(len(items))]
    try:
        with ThreadPoolExecutor(max(1, settings["concurrency"])) as pool:
            list(pool.map(lambda job: job[0](job[1]), jobs))
    except openai.APIError as e:
        raise FmkitError(f"{model.name}: a canary request failed ({type(e).__name__}: {str(e)[:200]})") from None
    return seen


def _generic(model, items: list, settings: dict, run: int) -> Observed:
    """Any other `Model`: one request per sample through the interface (text only, plus whole-text
    log-likelihoods where the backend computes them)."""
    seen = Observed([Answers() for _ in items])
    for i, item in enumerate(items):
        reqs = [GenRequest(item.input, [], settings["max_tokens"], settings["temperature"],
                           seed_of(settings, run, i) + j) for j in range(settings["samples"])]
        chat = isinstance(item.input, list) or settings["endpoint"] == "chat"
        seen.answers[i].texts = (model.chat if chat else model.generate)(reqs)
        seen.answers[i].finish = [""] * len(reqs)
    if settings["logprobs"]:
        texts = [fixed_text(item) for item in items]
        scored = [j for j, t in enumerate(texts) if t]
        if "loglikelihood" in model.capabilities and scored:
            for j, (ll, _) in zip(scored, model.loglikelihood_rolling([texts[j] for j in scored])):
                seen.answers[j].logprobs = {"total": ll}
        for a in seen.answers:
            a.logprob_note = "" if a.logprobs else f"{model.name} returns no log-probabilities for it"
    seen.served_as[model.name] += 1
    return seen
