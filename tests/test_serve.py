"""fmkit serve over real HTTP with the real openai SDK: a server on a free local port, a tiny Llama, a LoRA adapter
of it and the packaged all-MiniLM-L6-v2."""
from __future__ import annotations

import base64
import gc
import json
import os
import socket
import subprocess
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
import torch

from conftest import save_fmkit_llama
from fmkit.server.launch import Background


def make_adapter(base, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fmkit.workspace import write_manifest

    torch.manual_seed(3)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)   # a LoRA that changes the outputs
    net.save_pretrained(out)
    write_manifest(out, {"kind": "adapter", "parent_model": str(base)})
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("serve")
    base = save_fmkit_llama(tokenizer_dir, root / "tiny", 256)
    return {"root": root, "base": base, "adapter": make_adapter(base, root / "tiny-lora")}


@pytest.fixture(scope="module")
def server(folders):
    bg = Background(models=[str(folders["base"]), str(folders["adapter"]), "minilm"], dtype="fp32",
                    max_batch=16, max_queue=64)
    with bg as url:
        yield bg, openai.OpenAI(base_url=url, api_key="none", max_retries=0)


def chat(client, text="hello", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=kw.pop("model", "tiny"),
                                          messages=[{"role": "user", "content": text}], **kw)


def loaded(bg, name):
    """The pool's loaded model `name` (loaded now if it is not)."""
    served = bg.app.state.pool.get(name)
    bg.app.state.pool.done(served)
    return served


def post(url, body: bytes | dict, headers=None):
    """A raw POST: (status, parsed body, headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def test_chat_matches_local_generation_and_reports_usage(server, folders):
    from fmkit.conversation import Chat

    bg, client = server
    r = chat(client, "def add(a, b):", max_tokens=10)
    local = Chat(folders["base"], max_new_tokens=10, temperature=0, dtype="fp32")
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


def test_echo_logprobs_score_multiple_choice_as_local_evaluation(server, folders, tmp_path):
    from test_eval import ITEMS, mc_task

    from fmkit.evals.runner import evaluate

    bg, client = server
    r = client.completions.create(model="tiny", prompt="def f(x):\n    return x", max_tokens=0, echo=True,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "def f(x):\n    return x" and lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and r.usage.completion_tokens == 0
    task = mc_task(tmp_path, ITEMS[:6], metrics=["acc", "acc_norm"])
    remote = evaluate("openai:tiny", [task], out=tmp_path / "remote", base_url=bg.url, workspace=tmp_path / "ws")
    local = evaluate(str(folders["base"]), [task], out=tmp_path / "local", workspace=tmp_path / "ws")
    rows = [[json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()] for run in (remote, local)]
    for a, b in zip(*rows):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)


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
    status, body, _ = post(bg.url + "/chat/completions", {"model": "tiny", "tools": [tool], "tool_choice": "auto",
                                                           "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and body["error"]["code"] == "tools_not_supported"   # fmkit's template has no tools


def test_adapters_are_switched_per_request_on_one_loaded_base(server, folders):
    from fmkit.models.generate import Generator

    bg, client = server
    base = client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    lora = client.completions.create(model="tiny-lora", prompt="def ", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert base.choices[0].text != lora.choices[0].text
    gen = Generator(folders["adapter"], dtype="fp32")
    ids = gen.tok("def ", add_special_tokens=False)["input_ids"]
    want = gen.generate_ids([ids], 12, 0.0, eos=None)[0][0]
    assert gen.tok.decode(want) == lora.choices[0].text
    assert base.system_fingerprint != lora.system_fingerprint
    assert list(bg.app.state.pool.bases) == [str(folders["base"])]   # read from disk once, merged per adapter


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


def test_keys_limits_and_a_full_queue(folders, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-one rpm=2 name=one\nsk-two\nsk-three tpm=10\n")
    with Background(models=[str(folders["base"])], api_keys=str(keys), max_batch=1, max_queue=1) as url:
        status, body, _ = post(url + "/chat/completions", {"model": "tiny", "messages": []})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            chat(bad)
        one = openai.OpenAI(base_url=url, api_key="sk-one", max_retries=0)
        chat(one), chat(one)
        with pytest.raises(openai.RateLimitError) as err:
            chat(one)
        assert int(err.value.response.headers["Retry-After"]) >= 1
        three = openai.OpenAI(base_url=url, api_key="sk-three", max_retries=0)
        assert chat(three, max_tokens=5).usage.total_tokens > 10            # spends the 10 tokens a minute
        with pytest.raises(openai.RateLimitError, match="rate limit"):
            chat(three, max_tokens=5)
        two = openai.OpenAI(base_url=url, api_key="sk-two", max_retries=0)

        def slow(i):
            try:
                chat(two, f"q{i}", max_tokens=60, extra_body={"ignore_eos": True})
                return 200
            except openai.RateLimitError as e:
                assert e.response.headers["Retry-After"] and e.body["code"] == "queue_full"
                return 429
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(slow, range(8)))
        assert 429 in codes and 200 in codes                           # one row, one waiting: the rest refused
        assert chat(two).choices                                       # and it serves again afterwards


def test_keep_alive_unloads_an_idle_model(server):
    bg, client = server
    pool = bg.app.state.pool
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


def test_memory_budget_evicts_the_least_recently_used(folders):
    with Background(models=[str(folders["base"]), str(folders["adapter"])], memory_mb=0.7, kv_cache_mb=1,
                    max_batch=1) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        chat(client, model="tiny")
        chat(client, model="tiny-lora")
        health = json.loads(urllib.request.urlopen(url.replace("/v1", "/health")).read())
        assert health["loaded"] == ["tiny-lora"]


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


def test_metrics_are_prometheus_text(server):
    bg, client = server
    chat(client)
    text = urllib.request.urlopen(bg.url.replace("/v1", "/metrics")).read().decode()
    for name in ("fmkit_requests_total", "fmkit_prompt_tokens_total", "fmkit_completion_tokens_total",
                 "fmkit_queue_depth", "fmkit_batch_size_bucket", "fmkit_time_to_first_token_seconds_bucket",
                 "fmkit_request_latency_seconds_bucket", "fmkit_errors_total", "fmkit_loaded_models"):
        assert name in text
    assert 'fmkit_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_fingerprint_follows_weights_template_and_dtype(folders, tmp_path):
    import shutil

    from fmkit.models.reference import resolve
    from fmkit.server.pool import fingerprint

    ref = resolve(folders["base"])
    tok = ref.tokenizer()
    same = fingerprint(resolve(folders["base"]), ref.tokenizer(), "fp32")
    assert fingerprint(ref, tok, "fp32") == same and fingerprint(ref, tok, "bf16") != same
    copy = shutil.copytree(folders["base"], tmp_path / "copy")
    assert fingerprint(resolve(copy), tok, "fp32") == same              # content, not the path
    tok.chat_template = "{{ messages }}"
    assert fingerprint(ref, tok, "fp32") != same
    from safetensors.torch import load_file, save_file
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint(resolve(copy), ref.tokenizer(), "fp32") != same


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


def start_command(*args, env=None):
    """`fmkit serve ARGS` on a free port, once /health says ready: (process, base URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fmkit", "serve", *args, "--port", str(port)],
                            env={**os.environ, "FMKIT_QUIET": "1", **(env or {})}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if json.loads(urllib.request.urlopen(url + "/health").read())["status"] == "ready":
                break
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
    return proc, url


def test_a_hub_model_is_served_under_its_hub_id(folders, tmp_path):
    import shutil

    repo = tmp_path / "hub" / "models--fmkit-test--tiny"
    shutil.copytree(folders["base"], repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    proc, url = start_command("hf:fmkit-test/tiny", env={"HF_HUB_CACHE": str(tmp_path / "hub"),
                                                         "HF_HUB_OFFLINE": "1"})
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["fmkit-test/tiny"]
        r = client.completions.create(model="fmkit-test/tiny", prompt="def ", max_tokens=4)
        assert r.model == "fmkit-test/tiny" and r.usage.completion_tokens >= 1
        assert client.models.retrieve("fmkit-test/tiny").id == "fmkit-test/tiny"
    finally:
        proc.kill()
        proc.wait()


def test_fmkit_serve_command_shuts_down_gracefully(folders):
    proc, url = start_command(str(folders["base"]), "--name", f"other={folders['base']}")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list()} == {"tiny", "other"}
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            r=chat(client, max_tokens=120, extra_body={"ignore_eos": True})))
        worker.start()
        time.sleep(1.0)
        proc.terminate()                                                 # SIGTERM with a request in flight
        worker.join(60)
        assert result["r"].usage.completion_tokens == 120               # it was finished, not dropped
        assert proc.wait(60) in (0, -15)                                 # uvicorn re-raises the signal
    finally:
        proc.kill()
        proc.wait()


def test_serve_refuses_bad_arguments_in_one_line(folders, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fmkit", "serve", *args], capture_output=True, text=True)

    for args, words in ([(), "nothing to serve"], [(str(tmp_path / "missing"),), "no such folder"],
                        [(str(folders["base"]), "--keep-alive", "soon"), "keep_alive"],
                        [(str(folders["base"]), str(folders["base"])), "--name"]):
        out = run(*args)
        assert out.returncode != 0 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_any_transformers_decoder_is_served_through_transformers(tmp_path, tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fmkit.models.io import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=128)).eval()
    model.save_pretrained(tmp_path / "gpt")
    tok.save_pretrained(tmp_path / "gpt")
    with Background(models=[str(tmp_path / "gpt")], max_batch=4) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(lambda p: client.completions.create(
                model="gpt", prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}),
                ["def ", "import os", "class A:"]))
        for prompt, out in zip(["def ", "import os", "class A:"], outs):
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            want = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, ids.shape[1]:]
            assert out.choices[0].text == tok.decode(want)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            chat(client, model="gpt")


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


def test_models_dir_serves_every_folder_in_it_even_new_ones(folders, tmp_path):
    import shutil

    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(folders["base"], root / "first")
    with Background(models_dir=str(root)) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["first"]
        shutil.copytree(folders["base"], root / "second")
        assert [m.id for m in client.models.list()] == ["first", "second"]
        assert chat(client, model="second").choices


def test_tool_calls_are_parsed_from_replies():
    from fmkit.server.tools import call_schema, parse_calls

    text = 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_calls(text, {"weather"})
    assert content == "Let me look." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert parse_calls('{"name": "weather", "arguments": {}}', {"weather"})[1][0]["function"]["name"] == "weather"
    assert parse_calls('<tool_call>{"name": "other"}</tool_call>', {"weather"}) == \
        ('<tool_call>{"name": "other"}</tool_call>', [])
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in "ab"]
    assert len(call_schema(tools, "required")["anyOf"]) == 2 and call_schema(tools, "b")["properties"]["name"] == \
        {"const": "b"}
