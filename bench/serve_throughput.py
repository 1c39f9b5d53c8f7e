"""fmkit serve vs transformers serve (plain and --continuous-batching) on the same checkpoint: tokens/s, TTFT and
latency under concurrent streaming chat requests, with fmkit's offline batched generation as the ceiling.

    python bench/serve_throughput.py [--clients 16] [--requests 8] [--max-tokens 128] [--dtype auto] [--quickstart]
                                     [--skip-transformers | --skip-fmkit]

Checkpoint: the reference LlamaForCausalLM (hidden 256, 4 layers, 4 heads, vocab 50304, tied embeddings, random
weights: speed does not depend on them) with a byte-level BPE tokenizer of exactly 50304 tokens trained on the
standard library (so every id the model can emit decodes), saved with fmkit's chat template in a temporary folder.
--quickstart also measures the trained quickstart model ($FMKIT_WORKSPACE or ./fmkit-workspace, models/quickstart),
copied with a chat template added when it has none.

Each contender is a server started as a subprocess on a free local port and measured alone: 2 warm-up requests,
then --clients threads, each with its own openai.OpenAI client, each sending --requests streaming
/v1/chat/completions requests (temperature 0, max_tokens --max-tokens, client i always sends prompt i of 16
distinct short prompts). TTFT is the time to the first chunk with text; latency is the whole request; tokens/s is
all completion tokens (the usage the server reports on its last chunk, else one per text chunk) over the wall time
from the first request to the last reply. Figures swing several-fold when other work shares the CPUs, so each
measurement also reports the CPU share other processes used meanwhile (from /proc). Greedy texts are compared
across contenders prompt by prompt (reported, not fatal). The ceiling: fmkit.Generator on the same folder and
prompts (chat template applied), batches of --clients rows, in a fresh process: tokens over time for batch after
batch for at least 2 s, a sustained rate like the server's (the fastest single batch is printed too). The clients
share the cores with the server, so the script also prints the bound that sets on fmkit serve's share of the
ceiling: the clients' CPU time per request (this process's) against the offline batch's per sequence. It also
prints where fmkit serve's own CPU time went per request: its main thread (the event loop) and its other threads
(the compute thread and its OpenMP team), the latter against the offline batch's time per sequence; and, for the
event loop and the compute thread, how their wall time split between running, waiting runnable for a CPU, and
asleep (the compute thread, with sequences to step, sleeps only for the interpreter lock).

Contenders:
  fmkit serve                            python -m fmkit serve FOLDER --host 127.0.0.1 --port P  (model: folder's name)
  transformers serve                     .bench-envs/tfserve/bin/transformers serve FOLDER --host 127.0.0.1 --port P
                                         --device cpu   (model: FOLDER, the exact string it was started with)
  transformers serve --continuous-batching   the same, with --continuous-batching

transformers serve 5.23.0, as read from its source (transformers/cli/serve.py, cli/serving/) and run here:
  - The positional argument (FORCE_MODEL) pins the server to one model and loads it before uvicorn listens, so a
    200 from GET /health means ready. A request's `model` must be that exact string (or absent): anything else is
    a 400 ("Server is pinned to ..."). A local folder works with HF_HUB_OFFLINE=1; responses name it "FOLDER@main".
  - GET /v1/models lists the Hugging Face cache, not the pinned model, and is a 500 when the cache folder does not
    exist; it is not usable as a readiness probe.
  - Request bodies are validated against the OpenAI parameter types: an unknown field (`ignore_eos`) is a 422, so
    it gets none; stream_options is accepted and ignored with a warning, but the last chunk (the one with
    finish_reason) carries usage anyway. EOS cannot be turned off per request; the reference model's random weights
    rarely emit it (the script prints how many requests stopped short).
  - Plain mode runs model.generate one request at a time on a single inference thread (requests queue); fp32 here
    (`--dtype auto` follows the weights). --continuous-batching runs a paged-attention batch on a background thread;
    it initialises on the first request (14-28 s on a 2-core machine; the warm-up absorbs it) and on the CPU sizes
    its paged KV cache at 60% of available memory (~11 GB resident here). After SIGINT that process does not exit
    (the batching thread is never stopped), so servers are stopped with SIGINT, then SIGTERM, then SIGKILL.
  - The first chunk of a chat stream is role-only (no content); text arrives one decoded token per chunk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REFERENCE, machine, run_code
from servers import cpu_seconds, free_port, log_tail, running, thread_times

HERE = Path(__file__).parent
ROOT = HERE.parent
TFSERVE = ROOT / ".bench-envs" / "tfserve"

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What does the walrus operator do?",
    "Explain list comprehensions in one sentence.",
    "How do I read a file line by line?",
    "Give an example of a dataclass.",
    "What is the difference between a tuple and a list?",
    "How do I sort a dictionary by value?",
    "Write a generator that yields squares.",
    "What does functools.lru_cache do?",
    "How do I parse JSON in Python?",
    "Show how to use a context manager.",
    "What is a decorator?",
    "How can I run a subprocess and capture its output?",
    "Write a function that checks for a palindrome.",
    "What are *args and **kwargs?",
    "How do I make an HTTP request with urllib?",
]


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def make_reference(folder: Path) -> Path:
    """The reference model with a 50304-token stdlib tokenizer and fmkit's chat template, as an fmkit model folder."""
    from fmkit.adapt.chat_template import CHAT_TEMPLATE
    from fmkit.models.io import load_tokenizer, save_model
    from fmkit.tokenize.tokenizer import train_tokenizer
    from transformers.utils import logging as hf_logging

    from common import reference_model

    hf_logging.disable_progress_bar()

    vocab = REFERENCE["vocab_size"]
    # no sentinels (3 special tokens only, so a random model rarely emits one: servers differ in whether they show
    # special tokens); min_frequency 1 over 16 MB of the whole stdlib reaches the full 50304 (stdlib:train does not)
    tok_dir = train_tokenizer("stdlib", folder / "tokenizer-trained", vocab_size=vocab, sentinels=0, min_frequency=1,
                              max_bytes=16_000_000, workspace=folder / "ws")
    tok = load_tokenizer(tok_dir)
    if len(tok) < vocab:  # a smaller stdlib: fill up with plain added tokens so every id the head can pick decodes
        tok.add_tokens([f"<|unused_{i}|>" for i in range(vocab - len(tok))])
    assert len(tok) == vocab, len(tok)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder / "tokenizer")
    model = reference_model()
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
    out = save_model(model, folder / "reference", folder / "tokenizer",
                     {"kind": "model", "note": "random init, benchmark only (bench/serve_throughput.py)"})
    shutil.rmtree(folder / "ws", ignore_errors=True)
    return out


def find_quickstart() -> Path | None:
    roots = [Path(os.environ["FMKIT_WORKSPACE"])] if os.environ.get("FMKIT_WORKSPACE") else []
    roots += [Path("fmkit-workspace"), ROOT / "fmkit-workspace"]
    for root in roots:
        folder = root / "models" / "quickstart"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder.resolve()
    return None


def with_chat_template(src: Path, dst: Path) -> Path:
    """A copy of a model folder's top-level files; fmkit's chat template added when the tokenizer has none."""
    from fmkit.adapt.chat_template import CHAT_TEMPLATE
    from transformers import AutoTokenizer

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    tok = AutoTokenizer.from_pretrained(dst)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# servers

def contenders(folder: Path, args, log_dir: Path) -> list[dict]:
    """How each server is started, what its requests name the model, and what extra request fields it takes."""
    out = []
    if not args.skip_fmkit:
        cmd = [sys.executable, "-m", "fmkit", "serve", str(folder), "--host", "127.0.0.1"]
        if args.dtype != "auto":
            cmd += ["--dtype", args.dtype]
        out.append(dict(name="fmkit serve", cmd=cmd, model=folder.name, health="/health",
                        extra={"ignore_eos": True}, env={"FMKIT_QUIET": "1"}))
    if not args.skip_transformers:
        cmd = [str(TFSERVE / "bin" / "transformers"), "serve", str(folder), "--host", "127.0.0.1", "--device", "cpu"]
        base = dict(model=str(folder), health="/health", extra={}, env={"HF_HUB_OFFLINE": "1"})
        out.append(dict(name="transformers serve", cmd=cmd, **base))
        out.append(dict(name="transformers serve --continuous-batching", cmd=cmd + ["--continuous-batching"], **base))
    for c in out:
        c["log"] = log_dir / (c["name"].replace(" ", "_").replace("-", "") + ".log")
    return out


def build_peer_env() -> bool:
    setup = subprocess.run(["bash", str(HERE / "peers" / "tfserve_env.sh"), str(TFSERVE)], capture_output=True,
                           text=True)
    if setup.returncode:
        print(f"transformers serve environment could not be created; peer skipped:\n{setup.stderr[-2000:]}")
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# load

def one_request(client, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    usage = None
    finish = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra or None)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                if first is None:
                    first = time.perf_counter()
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    end = time.perf_counter()
    return dict(ttft=(first or end) - start, latency=end - start, text="".join(parts), finish=finish,
                tokens=usage.completion_tokens if usage is not None else len(parts), usage=usage is not None)


def measure(base_url: str, contender: dict, args, server_pid: int) -> dict:
    import openai

    def client():
        return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=1800)

    warm = client()
    t0 = time.perf_counter()
    for prompt in PROMPTS[:2]:  # fmkit serve loads the model on its first request; CB initialises on its first
        one_request(warm, contender["model"], prompt, args.max_tokens, contender["extra"])
    warmup = time.perf_counter() - t0

    results: list[list[dict]] = [[] for _ in range(args.clients)]
    errors: list[BaseException] = []
    gate = threading.Barrier(args.clients + 1)

    def worker(i: int) -> None:
        c = client()
        prompt = PROMPTS[i % len(PROMPTS)]
        gate.wait()
        try:
            for _ in range(args.requests):
                results[i].append(one_request(c, contender["model"], prompt, args.max_tokens, contender["extra"]))
        except BaseException as e:  # reported after the others finish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    cpu0 = (cpu_seconds(), cpu_seconds(server_pid), sum(os.times()[:2]))
    threads0 = thread_times(server_pid)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu1 = (cpu_seconds(), cpu_seconds(server_pid), sum(os.times()[:2]))
    threads1 = thread_times(server_pid)
    # what the rest of the machine used meanwhile: other work on a shared 2-core machine skews every figure
    others = None
    if None not in cpu0 + cpu1:
        others = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]) - (cpu1[2] - cpu0[2])) / (wall * os.cpu_count())
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed, the first with: {errors[0]!r}")
    flat = [r for rows in results for r in rows]
    texts = {}
    differ = ""
    for i, rows in enumerate(results):
        texts.setdefault(i % len(PROMPTS), rows[0]["text"])
        for k, r in enumerate(rows):
            if r["text"] != rows[0]["text"] and not differ:
                a, b = rows[0]["text"], r["text"]
                n = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                differ = (f"client {i}, repeat {k} against its first, from character {n}: "
                          f"{a[max(0, n - 10):n + 20]!r} / {b[max(0, n - 10):n + 20]!r}")
    tokens = sum(r["tokens"] for r in flat)
    client_cpu = (cpu1[2] - cpu0[2]) / len(flat)   # this process: the openai clients' own work per request
    # where two of fmkit serve's threads spent the wall time: the event loop (the main thread), and the compute
    # thread that steps the model: on a CPU, runnable but waiting for one, or asleep (for the compute thread, with
    # sequences to step: waiting for the interpreter lock). The compute thread names itself; its OpenMP team,
    # started later, inherits the name with higher ids.
    compute = min((tid for tid, (name, _, _) in threads1.items() if name == "fmkit-compute"), default=None)
    sched = {}
    for role, tid in (("event loop", server_pid), ("compute thread", compute)):
        if tid in threads0 and tid in threads1:
            ran, waited = threads1[tid][1] - threads0[tid][1], threads1[tid][2] - threads0[tid][2]
            sched[role] = (ran, waited, max(0.0, wall - ran - waited))
    server_cpu = None   # per request: the event loop's, and the rest of the process's (the model's threads)
    if "event loop" in sched and None not in (cpu0[1], cpu1[1]):
        loop = sched["event loop"][0]
        server_cpu = (loop / len(flat), (cpu1[1] - cpu0[1] - loop) / len(flat))
    return dict(warmup=warmup, wall=wall, tokens=tokens, others=others, rate=tokens / wall, requests=len(flat),
                client_cpu=client_cpu, server_cpu=server_cpu, sched=sched,
                ttft=[r["ttft"] for r in flat], latency=[r["latency"] for r in flat], texts=texts,
                repeats_differ=differ, usage=all(r["usage"] for r in flat),
                short=sum(r["tokens"] < args.max_tokens for r in flat))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ----------------------------------------------------------------------------------------------------------------
# the ceiling: offline batched generation

OFFLINE = """
import json, sys, time
from fmkit import Generator
folder, dtype, n, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.argv[5])
gen = Generator(folder, dtype=dtype)
texts = [gen.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in prompts]
texts = [texts[i % len(texts)] for i in range(n)]
gen(texts[:2], max_new_tokens=8, temperature=0)
# sustained, like the server's figure: batch after batch for 2 s (at least 5), all tokens over all the time; the
# fastest single batch is reported beside it (a batch of the quickstart model lasts ~0.07 s and swings 2x)
runs, total, cpu, tokens, best = 0, 0.0, 0.0, 0, 0.0
while runs < 5 or total < 2.0:
    t0, c0 = time.perf_counter(), time.process_time()
    out = gen(texts, max_new_tokens=max_new, temperature=0)
    s = time.perf_counter() - t0
    made = sum(len(c.tokens) for c in out)
    runs, total, cpu = runs + 1, total + s, cpu + time.process_time() - c0
    tokens, best = tokens + made, max(best, made / s)
print(json.dumps(dict(seconds=total, runs=runs, cpu=cpu / runs, tokens=tokens, rate=tokens / total, best=best,
                      dtype=gen.dtype, texts=[c.text for c in out[:len(prompts)]])))
"""


def offline(folder: Path, args) -> dict:
    return run_code(OFFLINE, str(folder), args.dtype, str(args.clients), str(args.max_tokens), json.dumps(PROMPTS),
                    name="fmkit offline generate")


# ----------------------------------------------------------------------------------------------------------------

def bench_model(label: str, folder: Path, args, log_dir: Path) -> None:
    print(f"\n== {label}: {folder}")
    print(f"{args.clients} clients x {args.requests} streaming chat requests, max_tokens {args.max_tokens}, "
          "temperature 0")
    ceiling = None
    if not args.skip_fmkit:
        ceiling = offline(folder, args)
        print(f"fmkit offline generate, batch {args.clients} x {args.max_tokens} new tokens ({ceiling['dtype']}): "
              f"{ceiling['rate']:,.0f} tokens/s over {ceiling['runs']} batches ({ceiling['tokens']} tokens in "
              f"{ceiling['seconds']:.2f} s; the fastest batch {ceiling['best']:,.0f} tokens/s)")
    rows: dict[str, dict] = {}
    for c in contenders(folder, args, log_dir):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        try:
            with running(c["cmd"] + ["--port", str(port)], c["env"], c["log"], base + c["health"]) as proc:
                ready = time.perf_counter() - t0
                rows[c["name"]] = r = measure(base + "/v1", c, args, proc.pid)
        except Exception as e:  # one contender failing does not lose the others' figures
            tail = "" if "before it was ready" in str(e) or "not ready after" in str(e) else \
                f"\nits log ends:\n{log_tail(c['log'], 1500)}"
            print(f"{c['name']}: failed: {e}{tail}")
            continue
        notes = [f"{r['tokens']} tokens in {r['wall']:.1f} s", f"/health 200 after {ready:.1f} s",
                 f"2 warm-up requests {r['warmup']:.1f} s"]
        if not r["usage"]:
            notes.append("no usage in the stream: tokens counted as text chunks")
        if r["short"]:
            notes.append(f"{r['short']} of {r['requests']} requests stopped before max_tokens")
        if r["others"] is not None:
            notes.append(f"other processes used {r['others']:.0%} of the CPUs meanwhile"
                         + (": FIGURES UNRELIABLE" if r["others"] > 0.1 else ""))
        if r["repeats_differ"]:
            notes.append(f"greedy texts differ between repeats of a prompt ({r['repeats_differ']})")
        print(f"{c['name']}: {r['rate']:,.0f} tokens/s; " + "; ".join(notes))

    if rows:
        print("\n| contender | tokens/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 |\n|---|---|---|---|---|---|")
        for name, r in rows.items():
            ttft, lat = r["ttft"], r["latency"]
            print(f"| {name} | {r['rate']:,.0f} | {percentile(ttft, .5):.2f} s | {percentile(ttft, .99):.2f} s"
                  f" | {percentile(lat, .5):.2f} s | {percentile(lat, .99):.2f} s |")
        if ceiling:
            print(f"| fmkit offline generate, batches of {args.clients} (ceiling) | {ceiling['rate']:,.0f} | | | | |")

    names = list(rows)
    if ceiling and "fmkit serve" in rows:
        rows["fmkit offline generate"] = dict(texts=dict(enumerate(ceiling["texts"])))
        names.append("fmkit offline generate")
    pairs = [(names[0], other) for other in names[1:]]
    plain, batching = "transformers serve", "transformers serve --continuous-batching"
    if names and names[0] != plain and plain in rows and batching in rows:
        pairs.append((plain, batching))
    for ref, other in pairs:
        a, b = rows[ref]["texts"], rows[other]["texts"]
        same = [k for k in a if k in b and a[k] == b[k]]
        line = f"greedy texts, {other} vs {ref}: {len(same)} of {len(a)} prompts identical"
        diff = [k for k in a if k in b and a[k] != b[k]]
        if diff:
            k = diff[0]
            n = next((i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y), min(len(a[k]), len(b[k])))
            line += f" (prompt {k}: first difference at character {n})"
        print(line)

    fm = rows.get("fmkit serve")
    cb = rows.get("transformers serve --continuous-batching")
    if fm and cb:
        print(f"fmkit serve / transformers serve --continuous-batching, tokens/s: {fm['rate'] / cb['rate']:.2f}x "
              "(target 3x)")
    if fm and ceiling:
        print(f"fmkit serve / fmkit offline generate, tokens/s: {fm['rate'] / ceiling['rate']:.1%} (target 70%; "
              f"{fm['rate'] / ceiling['best']:.0%} of the fastest batch)")
        # the clients run on the same cores as the server: what they use is not there for the model
        model_cpu = ceiling["cpu"] / args.clients   # CPU seconds the offline batch spent per sequence
        bound = model_cpu / (model_cpu + fm["client_cpu"])
        print(f"the clients used {fm['client_cpu'] * 1e3:.1f} ms of CPU per request, the offline batch "
              f"{model_cpu * 1e3:.1f} ms per sequence: on these {os.cpu_count()} cores a server that cost nothing "
              f"would reach at most {bound:.0%} of the ceiling")
        if fm["server_cpu"] is not None:
            loop, model = fm["server_cpu"]
            print(f"fmkit serve used {(loop + model) * 1e3:.1f} ms of CPU per request: {loop * 1e3:.1f} ms on its "
                  f"event loop's thread (HTTP, JSON, streams), {model * 1e3:.1f} ms on the model's threads (the "
                  f"offline batch: {model_cpu * 1e3:.1f} ms per sequence)")
        for role, (ran, waited, slept) in fm["sched"].items():
            print(f"fmkit serve's {role}, of the {fm['wall']:.2f} s: {ran:.2f} s on a CPU, {waited:.2f} s runnable "
                  f"waiting for one, {slept:.2f} s asleep")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (threads)")
    ap.add_argument("--requests", type=int, default=8,
                    help="requests per client (with 2, fmkit's whole measurement lasts ~2 s and swings ±30%%)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true", help="fmkit serve and the offline ceiling only")
    ap.add_argument("--skip-fmkit", action="store_true", help="transformers serve only")
    ap.add_argument("--quickstart", action="store_true", help="also the trained quickstart model, when one exists")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="fmkit's dtype, serve and offline (transformers serve computes in the weights' fp32)")
    args = ap.parse_args()
    if not args.skip_transformers and not build_peer_env():
        args.skip_transformers = True

    # SIGTERM ends the script through its finally blocks (servers stopped), like Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="fmkit-serve-bench-") as tmp:
        tmp = Path(tmp)
        models = [("reference model (random weights)", make_reference(tmp))]
        if args.quickstart:
            qs = find_quickstart()
            if qs is None:
                print("--quickstart: no trained quickstart model (fmkit-workspace/models/quickstart or "
                      "$FMKIT_WORKSPACE/models/quickstart); run `fmkit quickstart` first. Skipped.")
            else:
                models.append(("quickstart model", with_chat_template(qs, tmp / "quickstart")))
        for label, folder in models:
            bench_model(label, folder, args, tmp)


if __name__ == "__main__":
    main()
