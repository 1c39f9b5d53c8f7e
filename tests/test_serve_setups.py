"""fmkit serve started in other ways: with keys and limits, a memory budget, a models folder or a hub id, as the
`fmkit serve` command (its shutdown and its refusals), for any transformers decoder; and what a served model's
fingerprint follows, and how tool calls are read from replies."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from serve_client import chat, post

from fmkit.server.launch import Background


def test_keys_limits_and_a_full_queue(serve_folders, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-one rpm=2 name=one\nsk-two\nsk-three tpm=10\n")
    with Background(models=[str(serve_folders["base"])], api_keys=str(keys), max_batch=1, max_queue=1) as url:
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


def test_memory_budget_evicts_the_least_recently_used(serve_folders):
    with Background(models=[str(serve_folders["base"]), str(serve_folders["adapter"])], memory_mb=0.7, kv_cache_mb=1,
                    max_batch=1) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        chat(client, model="tiny")
        chat(client, model="tiny-lora")
        health = json.loads(urllib.request.urlopen(url.replace("/v1", "/health")).read())
        assert health["loaded"] == ["tiny-lora"]


def test_fingerprint_follows_weights_template_and_dtype(serve_folders, tmp_path):
    import shutil

    from fmkit.models.reference import resolve
    from fmkit.server.pool import fingerprint

    ref = resolve(serve_folders["base"])
    tok = ref.tokenizer()
    same = fingerprint(resolve(serve_folders["base"]), ref.tokenizer(), "fp32")
    assert fingerprint(ref, tok, "fp32") == same and fingerprint(ref, tok, "bf16") != same
    copy = shutil.copytree(serve_folders["base"], tmp_path / "copy")
    assert fingerprint(resolve(copy), tok, "fp32") == same              # content, not the path
    tok.chat_template = "{{ messages }}"
    assert fingerprint(ref, tok, "fp32") != same
    from safetensors.torch import load_file, save_file
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint(resolve(copy), ref.tokenizer(), "fp32") != same


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


def test_a_hub_model_is_served_under_its_hub_id(serve_folders, tmp_path):
    import shutil

    repo = tmp_path / "hub" / "models--fmkit-test--tiny"
    shutil.copytree(serve_folders["base"], repo / "snapshots" / ("a" * 40))
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


def test_fmkit_serve_command_shuts_down_gracefully(serve_folders):
    proc, url = start_command(str(serve_folders["base"]), "--name", f"other={serve_folders['base']}")
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


def test_serve_refuses_bad_arguments_in_one_line(serve_folders, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "fmkit", "serve", *args], capture_output=True, text=True)

    for args, words in ([(), "nothing to serve"], [(str(tmp_path / "missing"),), "no such folder"],
                        [(str(serve_folders["base"]), "--keep-alive", "soon"), "keep_alive"],
                        [(str(serve_folders["base"]), str(serve_folders["base"])), "--name"]):
        out = run(*args)
        assert out.returncode != 0 and words in out.stderr and "Traceback" not in out.stderr, out.stderr
    with socket.socket() as taken:                          # a port in use: said so, and no "serving" line first
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = run(str(serve_folders["base"]), "--port", str(taken.getsockname()[1]))
    assert out.returncode != 0 and "cannot listen on 127.0.0.1" in out.stderr and "serving" not in out.stdout, out


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


def test_models_dir_serves_every_folder_in_it_even_new_ones(serve_folders, tmp_path):
    import shutil

    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(serve_folders["base"], root / "first")
    with Background(models_dir=str(root)) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["first"]
        shutil.copytree(serve_folders["base"], root / "second")
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
