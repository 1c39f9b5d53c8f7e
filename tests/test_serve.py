"""fmkit serve over real HTTP with the real openai SDK: a server on a free local port, a tiny Llama, a LoRA adapter
of it and the packaged all-MiniLM-L6-v2."""
from __future__ import annotations

import base64
import gc
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from serve_client import chat, loaded, post

from fmkit.server.launch import Background


@pytest.fixture(scope="module")
def server(serve_folders):
    bg = Background(models=[str(serve_folders["base"]), str(serve_folders["adapter"]), "minilm"], dtype="fp32",
                    max_batch=16, max_queue=64)
    with bg as url:
        yield bg, openai.OpenAI(base_url=url, api_key="none", max_retries=0)


def test_chat_matches_local_generation_and_reports_usage(server, serve_folders):
    from fmkit.conversation import Chat

    bg, client = server
    r = chat(client, "def add(a, b):", max_tokens=10)
    local = Chat(serve_folders["base"], max_new_tokens=10, temperature=0, dtype="fp32")
    prompt = local._prompt([{"role": "user", "content": "def add(a, b):"}])
    want = local.gen([prompt], max_new_tokens=10, temperature=0)[0]
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.usage.prompt_tokens == len(local.gen.tok(prompt, add_special_tokens=False)["input_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint.startswith("fp_") and r.model == "tiny" and r.object == "chat.completion"
    r2 = chat(client, "def add(a, b):", max_completion_tokens=4)
    assert r2.usage.completion_tokens <= 4 and r2.choices[0].finish_reason == "length"
    listed = {m.id for m in client.models.list()}
    assert listed == {"tiny", "tiny-lora", "minilm"}


def test_echo_logprobs_score_multiple_choice_as_local_evaluation(server, serve_folders, tmp_path):
    from test_eval import ITEMS, mc_task

    from fmkit.evals.runner import evaluate

    bg, client = server
    r = client.completions.create(model="tiny", prompt="def f(x):\n    return x", max_tokens=0, echo=True,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "def f(x):\n    return x" and lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and r.usage.completion_tokens == 0
    # prompts ending in whitespace too: "\n    " then "return x" is tokenized across the boundary, and both sides
    # must give the whitespace to the answer
    items = ITEMS[:6] + [{**i, "id": f"w{k}", "question": i["question"].replace("return", ""),
                          "choices": ["return" + c for c in i["choices"]]} for k, i in enumerate(ITEMS[:4])]
    for k, delimiter in enumerate((" ", "")):
        (tmp_path / str(k)).mkdir()
        task = mc_task(tmp_path / str(k), items, metrics=["acc", "acc_norm"], target_delimiter=delimiter)
        out = tmp_path / str(k)
        remote = evaluate("openai:tiny", [task], out=out / "remote", base_url=bg.url, workspace=tmp_path / "ws")
        local = evaluate(str(serve_folders["base"]), [task], out=out / "local", workspace=tmp_path / "ws")
        rows = [[json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
                for run in (remote, local)]
        assert len(rows[0]) == len(items)
        for a, b in zip(*rows):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4), a["id"]


def test_evaluating_over_http_says_what_is_wrong(server):
    from fmkit.errors import FmkitError
    from fmkit.providers.openai_api import OpenAIModel

    bg, _ = server
    request = [("def f(x):\n    return", " x")]
    with pytest.raises(FmkitError, match="does not exist; this server serves: tiny") as err:
        OpenAIModel("nope", base_url=bg.url, max_retries=0).loglikelihood(request)
    assert "scoring: generate" not in str(err.value)       # not advice for a server without logprobs
    with pytest.raises(FmkitError, match="--base-url .*/v1"):
        OpenAIModel("tiny", base_url=bg.url.removesuffix("/v1"), max_retries=0).loglikelihood(request)
    with pytest.raises(FmkitError, match="at http://127.0.0.1:1/v1: giving up"):   # nothing listens there
        OpenAIModel("tiny", base_url="http://127.0.0.1:1/v1", max_retries=0).loglikelihood(request)


def test_completions_take_strings_lists_and_token_ids(server):
    bg, client = server
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    many = client.completions.create(model="tiny", prompt=["def ", "import"], max_tokens=3, temperature=0, n=2)
    assert ids.usage.prompt_tokens == 3 and len(ids.choices) == 1
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text    # greedy: both choices of one prompt agree
    stop = client.completions.create(model="tiny", prompt="def ", max_tokens=20, temperature=0)
    cut = stop.choices[0].text[3:5]
    if cut.strip():
        again = client.completions.create(model="tiny", prompt="def ", max_tokens=20, temperature=0, stop=[cut])
        assert cut not in again.choices[0].text and again.choices[0].finish_reason == "stop"


def test_streaming_chunks_and_final_usage(server):
    bg, client = server
    whole = chat(client, "stream me", max_tokens=16)
    chunks = list(chat(client, "stream me", max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(chat(client, "stream me", max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    comp = list(client.completions.create(model="tiny", prompt="def ", max_tokens=6, temperature=0, stream=True))
    assert comp[-1].choices[0].finish_reason in ("stop", "length")


def test_n_seed_and_logprobs(server):
    bg, client = server
    a = chat(client, "sample", max_tokens=12, temperature=1.0, seed=7, n=3, logprobs=True, top_logprobs=2)
    b = chat(client, "sample", max_tokens=12, temperature=1.0, seed=7, n=3)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) > 1
    entry = a.choices[0].logprobs.content[0]
    assert len(entry.top_logprobs) == 2 and entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)


def test_a_seeded_request_is_the_same_alone_and_among_fifteen_others(server):
    bg, client = server
    ask = dict(max_tokens=24, temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    alone = chat(client, "determinism", **ask).choices[0].message.content
    with ThreadPoolExecutor(16) as pool:
        others = [pool.submit(chat, client, f"other {i}", max_tokens=24, temperature=1.0, seed=i) for i in range(15)]
        mine = pool.submit(chat, client, "determinism", **ask)
        [f.result() for f in others]
        assert mine.result().choices[0].message.content == alone


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"type": "string"}},
                                         "required": ["kind"], "additionalProperties": False}]}},
    "required": ["name", "age", "tags", "pet"], "additionalProperties": False}


def test_json_schema_outputs_parse_and_validate(server):
    bg, client = server
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        r = chat(client, "a person as JSON", max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    obj = chat(client, "any JSON", max_tokens=30, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    tool = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}}
    r = chat(client, "weather in Paris?", max_tokens=40, tools=[tool],
             tool_choice={"type": "function", "function": {"name": "weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    for max_tokens in range(1, 12):   # cut short: no call text in content; the call as far as it got, named
        r = chat(client, "weather in Paris?", max_tokens=max_tokens, tools=[tool], tool_choice="required")
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "length" and message.content is None, message
        assert all(c.function.name == "weather" for c in message.tool_calls or [])
    status, body, _ = post(bg.url + "/chat/completions", {"model": "tiny", "tools": [tool], "tool_choice": "auto",
                                                           "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and body["error"]["code"] == "tools_not_supported"   # fmkit's template has no tools


def test_adapters_are_switched_per_request_on_one_loaded_base(server, serve_folders):
    from fmkit.models.generate import Generator

    bg, client = server
    base = client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    lora = client.completions.create(model="tiny-lora", prompt="def ", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert base.choices[0].text != lora.choices[0].text
    gen = Generator(serve_folders["adapter"], dtype="fp32")
    ids = gen.tok("def ", add_special_tokens=False)["input_ids"]
    want = gen.generate_ids([ids], 12, 0.0, eos=None)[0][0]
    assert gen.tok.decode(want) == lora.choices[0].text
    assert base.system_fingerprint != lora.system_fingerprint
    assert list(bg.app.state.pool.bases) == [str(serve_folders["base"])]   # read from disk once, merged per adapter


def test_embeddings_from_the_packaged_encoder_and_a_decoder(server):
    import numpy as np

    from fmkit.adapt.rag.encoder import builtin_folder, load_encoder

    bg, client = server
    texts = ["a cat sat on the mat", "stock prices fell"]
    r = client.embeddings.create(model="minilm", input=texts)
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (2, 384) and r.usage.prompt_tokens > 0
    np.testing.assert_allclose(vecs, load_encoder(builtin_folder()).embed(texts), atol=1e-5)
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")  # the SDK's default
    b64 = client.embeddings.create(model="minilm", input=texts, encoding_format="base64")    # is base64, decoded
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data]
    np.testing.assert_allclose(np.array(decoded), vecs, atol=1e-6)
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), vecs, atol=1e-6)
    small = client.embeddings.create(model="minilm", input=texts[0], dimensions=64)
    assert len(small.data[0].embedding) == 64 and abs(np.linalg.norm(small.data[0].embedding) - 1) < 1e-5
    dec = client.embeddings.create(model="tiny", input=[[5, 6, 7], "def f"])
    assert len(dec.data[0].embedding) == 64 and abs(np.linalg.norm(dec.data[1].embedding) - 1) < 1e-5
    status, body, _ = post(bg.url + "/embeddings", {"model": "minilm", "input": texts, "dimensions": 999})
    assert status == 400 and body["error"]["param"] == "dimensions"


def test_errors_come_in_openai_envelopes(server):
    bg, client = server
    url = bg.url + "/chat/completions"
    msg = [{"role": "user", "content": "x"}]
    cases = [
        (b"{not json", 400, "invalid_json", None),
        ({"model": "tiny"}, 400, "missing_required_parameter", "messages"),
        ({"model": "tiny", "messages": "hi"}, 400, "invalid_type", "messages"),
        ({"model": "tiny", "messages": msg, "temperature": "hot"}, 400, "invalid_type", "temperature"),
        ({"model": "tiny", "messages": msg, "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
        ({"model": "tiny", "messages": msg, "max_tokens": 10 ** 9}, 400, "context_length_exceeded", "messages"),
        ({"model": "tiny", "messages": msg, "n": 10 ** 6}, 400, "invalid_value", "n"),
        ({"model": "tiny", "messages": msg, "top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
        ({"model": "tiny", "messages": msg, "stream_options": {"include_usage": True}}, 400, "invalid_value",
         "stream_options"),
        ({"model": "tiny", "messages": msg, "frobnicate": 1}, 400, "unrecognized_argument", "frobnicate"),
        ({"model": "minilm", "messages": msg}, 400, "model_not_supported", "model"),
        ({"model": "gpt-9", "messages": msg}, 404, "model_not_found", "model"),
    ]
    for body, status, code, param in cases:
        got, out, _ = post(url, body)
        assert (got, out["error"]["code"], out["error"]["param"]) == (status, code, param), body
        assert isinstance(out["error"]["message"], str) and out["error"]["type"]
    long = "word " * 400
    got, out, _ = post(url, {"model": "tiny", "messages": [{"role": "user", "content": long}]})
    assert got == 400 and "256" in out["error"]["message"]           # names the context length
    got, out, _ = post(url, b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (10 << 20) + b'"}')
    assert got == 413 and out["error"]["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError, match="serves: tiny"):
        chat(client, model="nope")
    got, out, _ = post(bg.url + "/responses-of-the-future", {})
    assert got == 404 and out["error"]["code"] == "unknown_url"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bg.url + "/chat/completions")          # GET where only POST is
    assert err.value.code == 405 and json.loads(err.value.read())["error"]["code"] == "method_not_allowed"
    assert chat(client).choices[0].message.content is not None       # and the next request is served


def test_keep_alive_unloads_an_idle_model(server):
    bg, client = server
    pool = bg.app.state.pool
    chat(client)   # the base, kept loaded
    chat(client, model="tiny-lora", extra_body={"keep_alive": 0})
    engine = weakref.ref(pool.loaded["tiny-lora"].engine)
    assert gc.get_freeze_count() > 0   # what was loaded is out of the full collections' way
    deadline = time.time() + 10
    while "tiny-lora" in pool.loaded and time.time() < deadline:
        time.sleep(0.1)
    assert "tiny-lora" not in pool.loaded and "tiny" in pool.loaded
    time.sleep(0.2)   # the sweep that unloaded it also settles the heap
    assert engine() is None   # its weights and cache are freed, not held until the next load
    metrics = urllib.request.urlopen(bg.url.replace("/v1", "/metrics")).read().decode()
    assert 'fmkit_model_unloaded_total{model="tiny-lora"} 1' in metrics
    assert chat(client, model="tiny-lora").choices      # loaded again on the next request


def test_a_client_that_disconnects_frees_its_row(server):
    bg, client = server
    engine = loaded(bg, "tiny").engine
    stream = chat(client, "long", max_tokens=200, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream)), next(iter(stream))
    stream.response.close()
    deadline = time.time() + 10
    while engine.busy and time.time() < deadline:
        time.sleep(0.05)
    assert engine.busy == 0
    assert chat(client).choices


def test_a_request_that_fails_inside_the_model_fails_alone(server, monkeypatch):
    bg, client = server
    runner = loaded(bg, "tiny").engine.runner
    real = runner.run

    def broken(ids, rows, slots, want):
        if 7 in ids:
            raise RuntimeError("boom")
        return real(ids, rows, slots, want)
    monkeypatch.setattr(runner, "run", broken)
    with pytest.raises(openai.InternalServerError, match="boom"):
        client.completions.create(model="tiny", prompt=[5, 7], max_tokens=3)
    assert client.completions.create(model="tiny", prompt=[5, 6], max_tokens=3).choices


def test_odd_values_are_refused_by_field_not_failed(server):
    """Inputs a range check or a tokenizer would let through or choke on: each is a 400 naming its field."""
    bg, client = server
    url = bg.url + "/chat/completions"
    msg = [{"role": "user", "content": "x"}]

    def refused(body, code, param):
        got, out, _ = post(url, body if isinstance(body, bytes) else json.dumps(body).encode())
        assert (got, out["error"]["code"], out["error"]["param"]) == (400, code, param), body

    for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):   # NaN passes < and >
        refused({"model": "tiny", "messages": msg, field: float("nan")}, "invalid_value", field)
    for seed in (1 << 64, -(1 << 63) - 1):
        refused({"model": "tiny", "messages": msg, "seed": seed}, "invalid_value", "seed")
    refused({"model": "tiny", "messages": [{"role": "user", "content": "a\ud800b"}]}, "invalid_value",
            "messages[0].content")
    got, out, _ = post(bg.url + "/completions", b'{"model": "tiny", "prompt": ["ok", "\\udc00"]}')
    assert (got, out["error"]["param"]) == (400, "prompt[1]")
    got, out, _ = post(bg.url + "/embeddings", b'{"model": "minilm", "input": "\\ud800"}')
    assert (got, out["error"]["param"]) == (400, "input")
    refused(b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json", None)
    refused({"model": "tiny", "messages": [{"role": "user", "content": "hi", "bogus": 1}]},
            "unrecognized_argument", "messages[0].bogus")
    refused({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "txt": "hi"}]}]},
            "unrecognized_argument", "messages[0].content[0].txt")
    refused({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "missing_required_parameter", "messages[0].content[0].text")
    refused({"model": "tiny", "messages": msg + [{"role": "tool", "content": "42"}]}, "missing_required_parameter",
            "messages[1].tool_call_id")
    refused({"model": "tiny", "messages": msg, "stream": True, "stream_options": {"include_usge": True}},
            "unrecognized_argument", "stream_options.include_usge")
    refused({"model": "tiny", "messages": msg, "user": 5}, "invalid_type", "user")
    # a prompt that cannot fit whatever its tokens is refused before it is tokenized
    got, out, _ = post(url, {"model": "tiny", "messages": [{"role": "user", "content": "a " * (3 << 20)}]})
    assert (got, out["error"]["code"]) == (400, "context_length_exceeded") and "characters" in out["error"]["message"]
    # and what the SDK sends in the same places still works
    assert client.chat.completions.create(model="tiny", max_tokens=3, seed=(1 << 63) - 1, user="u-1", messages=[
        {"role": "user", "content": [{"type": "text", "text": "emoji \U0001F600"}], "name": "ann"}],
        stream=False).choices


def test_a_bug_in_a_route_is_a_500_in_the_envelope_and_counted(server, monkeypatch):
    from fmkit.server import generation

    bg, client = server

    def broken(served, body, policy=None):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(generation, "chat_job", broken)
    got, out, headers = post(bg.url + "/chat/completions", {"model": "tiny", "messages": [{"role": "user",
                                                                                            "content": "x"}]})
    assert (got, out["error"]["type"], out["error"]["code"]) == (500, "server_error", "internal_error")
    assert "a bug" not in out["error"]["message"]   # the type of the failure, not its text
    monkeypatch.undo()
    text = urllib.request.urlopen(bg.url.replace("/v1", "/metrics")).read().decode()
    assert 'fmkit_requests_total{endpoint="/v1/chat/completions",status="500"}' in text
    assert chat(client).choices


def test_metrics_label_routes_and_escape_what_clients_send(server):
    """/metrics stays parseable and bounded whatever paths clients send: a series per route, not per path."""
    bg, _ = server
    for path in ('/x%22y%0Az%5C', "/models/no-such-model", "/junk-1", "/junk-2"):
        try:
            urllib.request.urlopen(bg.url + path)
        except urllib.error.HTTPError:
            pass
    text = urllib.request.urlopen(bg.url.replace("/v1", "/metrics")).read().decode()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="([^"\\\n]|\\["\\n])*",?)*\})? \S+$')
    assert all(line.startswith("#") or sample.match(line) for line in text.splitlines()), text
    assert 'endpoint="unmatched",status="404"' in text and "junk" not in text
    assert 'endpoint="/v1/models/{name:path}",status="404"' in text and "no-such-model" not in text


def test_metrics_are_prometheus_text(server):
    bg, client = server
    chat(client)
    text = urllib.request.urlopen(bg.url.replace("/v1", "/metrics")).read().decode()
    for name in ("fmkit_requests_total", "fmkit_prompt_tokens_total", "fmkit_completion_tokens_total",
                 "fmkit_queue_depth", "fmkit_batch_size_bucket", "fmkit_time_to_first_token_seconds_bucket",
                 "fmkit_request_latency_seconds_bucket", "fmkit_errors_total", "fmkit_loaded_models"):
        assert name in text
    assert 'fmkit_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names from /proc")
def test_the_compute_thread_is_named_in_the_operating_system(server):
    bg, client = server
    chat(client)
    names = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names[int(tid)] = f.read().strip()
    compute = [t for t in threading.enumerate() if t.name == "fmkit-compute" and t.is_alive()]
    assert compute and all(names.get(t.native_id) == "fmkit-compute" for t in compute)


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_load_sixteen_clients_a_thousand_requests_no_5xx(server):
    bg, client = server
    url = bg.url + "/chat/completions"
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    bad = [{"model": "tiny"}, {"model": "nope", "messages": good["messages"]}, b"{oops",
           {**good, "max_tokens": -1}, {**good, "temperature": 9}, {**good, "n": 0}]

    def one(i):
        return post(url, bad[i % len(bad)] if i % 3 == 0 else {**good, "seed": i, "temperature": 0.7})[0]

    with ThreadPoolExecutor(16) as pool:
        first = list(pool.map(one, range(500)))
        middle = _rss_mb()
        second = list(pool.map(one, range(500, 1000)))
    end = _rss_mb()
    codes = first + second
    assert not [c for c in codes if c >= 500]
    assert codes.count(200) == sum(1 for i in range(1000) if i % 3) and set(codes) <= {200, 400, 404}
    assert end - middle < 50, f"memory grew {end - middle:.0f} MB over the second 500 requests"


def test_a_non_streaming_client_that_goes_away_frees_its_row(server, monkeypatch):
    import http.client

    bg, client = server
    engine = loaded(bg, "tiny").engine
    step, seen = engine.runner.run, []
    monkeypatch.setattr(engine.runner, "run", lambda *a: (time.sleep(0.02), step(*a))[1])  # 230 steps: 5 s
    observe = engine.observe
    monkeypatch.setattr(engine, "observe", lambda event, v: (seen.append(v.finish_reason)
                                                              if event == "finished" else None, observe(event, v)))
    conn = http.client.HTTPConnection("127.0.0.1", bg.port, timeout=5)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 230,
                       "ignore_eos": True})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    deadline = time.time() + 5
    while not engine.busy and time.time() < deadline:
        time.sleep(0.01)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while engine.busy and time.time() < deadline:
        time.sleep(0.05)
    assert engine.busy == 0
    assert seen == ["cancelled"]


def test_penalties_and_logit_bias_change_the_choice(server):
    bg, client = server
    plain = client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    forced = client.completions.create(model="tiny", prompt="def ", max_tokens=6, temperature=0,
                                       logit_bias={"42": 100}, logprobs=1)
    assert forced.choices[0].logprobs.tokens == [bg.app.state.pool.loaded["tiny"].tok.decode([42])] * 6
    penalised = client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body={"ignore_eos": True})
    tokens = lambda r: r.choices[0].text  # noqa: E731
    assert tokens(penalised) != tokens(plain)
    tok = bg.app.state.pool.loaded["tiny"].tok
    ids = tok(penalised.choices[0].text, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) >= len(set(tok(plain.choices[0].text, add_special_tokens=False)["input_ids"]))


def test_a_short_request_does_not_wait_for_a_long_one(server, monkeypatch):
    bg, client = server
    engine = loaded(bg, "tiny").engine
    step = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda *a: (time.sleep(0.01), step(*a))[1])  # ~10 ms a token
    done = {}

    def run(name, n):
        chat(client, name, max_tokens=n, extra_body={"ignore_eos": True})
        done[name] = time.monotonic()
    long = threading.Thread(target=run, args=("long", 200))
    long.start()
    time.sleep(0.3)                       # the long one is decoding when the short one arrives
    run("short", 5)
    long.join()
    assert done["short"] < done["long"] - 0.5
