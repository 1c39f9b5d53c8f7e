"""fmkit monitor: the drift tests' false-alarm rates, and the monitor against a real `fmkit serve` over HTTP whose
model is swapped between runs (one optimizer step, bf16 instead of fp32, a LoRA adapter) or left alone."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

import fmkit
from fmkit.cli import app
from fmkit.errors import FmkitError
from fmkit.select import drift
from monitor_swaps import lora, one_step, swap, tiny_model, write_suite

# a test-sized monitor: 4 baseline runs, 8 samples per canary, 4999 permutations; alpha 0.05 over 100 runs
SETTINGS = dict(samples=8, temperature=0.7, max_tokens=16, baseline_runs=4, alpha=0.05, horizon=100,
                permutations=4999, endpoint="completions")


# ---- the tests themselves ---------------------------------------------------------------------------------------
def test_permutation_p_values_are_valid_when_runs_are_exchangeable():
    rng = np.random.default_rng(0)
    lp, mm = [], []
    for trial in range(300):
        mu = rng.normal(size=(3, 6))
        runs = [[{str(t): mu[i, t] + 0.01 * rng.normal() for t in range(6)} for _ in range(5)] for i in range(3)]
        lp.append(drift.logprob_test([(r[:4], r[4:]) for r in runs], 199, trial).p_value)
        words = rng.choice(["the cat", "a dog sat", "cats", "dogs run far"], size=(2, 30), p=[.4, .3, .2, .1])
        mm.append(drift.mmd_test([(list(w[:24]), list(w[24:])) for w in words], "ngram", 199, trial).p_value)
    for ps in (np.array(lp), np.array(mm)):
        for alpha in (0.05, 0.1, 0.2):   # P(p <= alpha) <= alpha, within three standard errors of 300 trials
            assert (ps <= alpha).mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / 300)


def test_identical_answers_give_p_one_and_a_tiny_change_the_smallest_p_value():
    same = [{"0:a": -1.25, "1:b": -2.5}] * 5
    assert drift.logprob_test([(same[:4], same[4:])] * 3, 999).p_value == 1.0
    moved = same[:4] + [{"0:a": -1.250002, "1:b": -2.5}]
    r = drift.logprob_test([(moved[:4], moved[4:])] * 4, 999)
    assert r.p_value <= 0.01 and r.prompts[0] == pytest.approx(1 / 5, abs=0.05)   # exactly (1/5)^4 and 1/5
    assert drift.mmd_test([(["abc"] * 20, ["abc"] * 5)], "hamming", 999).p_value == 1.0
    assert drift.mmd_test([(["abc"] * 20, ["xyz"] * 5)], "ngram", 999).p_value == 1 / 1000


def test_tests_are_reproducible_with_a_fixed_seed():
    rng = np.random.default_rng(1)
    texts = [list(rng.choice(["ab", "abc", "b"], 30)) for _ in range(3)]
    args = [(t[:24], t[24:]) for t in texts]
    assert drift.mmd_test(args, "ngram", 499, 7).p_value == drift.mmd_test(args, "ngram", 499, 7).p_value


def test_string_kernels_are_similarities_with_a_unit_diagonal():
    texts = ["def f():", "def g():", "", "zzzz", "def f():"]
    for kernel in drift.KERNELS.values():
        k = kernel(texts)
        assert np.allclose(np.diag(k), 1) and np.allclose(k, k.T) and np.linalg.eigvalsh(k).min() > -1e-9
        assert k[0, 4] == pytest.approx(1) and k[0, 1] > k[0, 3]


def test_mcnemar_pairs_name_the_prompts_that_flipped():
    pairs = [(0, 1.0, 0.0)] * 9 + [(1, 1.0, 1.0)] * 9
    r = drift.task_test(pairs)
    assert r.p_value < 0.01 and r.detail["worse"] == 9 and r.prompts[0] < 0.01 and r.prompts[1] == 1.0


def test_cusum_keeps_false_alarms_over_the_horizon_below_alpha():
    rng = np.random.default_rng(2)
    alpha, horizon = 0.05, 200
    h = drift.threshold(alpha, horizon, 1)
    alarms = 0
    for _ in range(400):
        s = 0.0
        for p in rng.uniform(size=horizon):
            s = drift.cusum_step(s, p)
            if s >= h:
                alarms += 1
                break
    assert alarms / 400 <= alpha
    # a changed model's smallest p-values pass the level in two runs
    assert drift.cusum_step(drift.cusum_step(0, 1 / 2000), 1 / 2000) >= h > drift.cusum_step(0, 1 / 2000)


# ---- suites and settings ------------------------------------------------------------------------------------------
def test_bad_canary_rows_name_their_file_and_line(tmp_path):
    suite = tmp_path / "c.jsonl"
    suite.write_text('{"input": "ok"}\n{"input": ""}\n{"inputs": "x"}\n')
    with pytest.raises(FmkitError, match=r"c.jsonl:2.*\n.*c.jsonl:3"):
        fmkit.monitor_init("m", "openai:x", str(suite), base_url="http://127.0.0.1:9/v1", workspace=tmp_path)
    with pytest.raises(FmkitError, match="--alpha"):
        fmkit.monitor_init("m", "openai:x", str(write_suite(suite)), alpha=2.0, workspace=tmp_path)


def test_usage_errors_exit_with_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fmkit", "monitor", "run", "nope", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no monitor named nope"), proc.stderr


# ---- against a real server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("monitor")
    orig = tiny_model(tokenizer_dir, root / "orig")
    models = root / "models"
    models.mkdir()
    shutil.copytree(orig, models / "tiny", copy_function=shutil.copy)
    variants = {"step": one_step(orig, root / "step"), "lora": lora(orig, root / "lora"),
                "big-lora": lora(orig, root / "big-lora", std=0.5)}
    with fmkit.Server(models_dir=str(models), dtype="fp32") as url, \
            fmkit.Server(models_dir=str(models), dtype="bf16") as bf16_url:
        yield {"root": root, "orig": orig, "models": models, "url": url, "bf16": bf16_url, **variants,
               "suite": write_suite(root / "canaries.jsonl")}


def start(world, name: str, **kw) -> str:
    """A monitor on the server's tiny model with its baseline runs taken."""
    fmkit.monitor_init(name, "openai:tiny", str(world["suite"]), base_url=world["url"], workspace=world["root"],
                       **{**SETTINGS, **kw})
    for _ in range(SETTINGS["baseline_runs"]):
        assert fmkit.monitor_run(name, workspace=world["root"])["baseline"]
    return name


def runs_to_alert(world, name: str, most: int = 4, **kw) -> tuple[int, dict]:
    for n in range(1, most + 1):
        r = fmkit.monitor_run(name, workspace=world["root"], **kw)
        if r["alert"]:
            return n, r
    return 0, r


@pytest.mark.parametrize("change", ["step", "bf16", "lora"])
def test_a_swapped_model_is_detected(world, change):
    name = start(world, f"swap-{change}")
    url = world["url"]
    if change == "bf16":
        url = world["bf16"]          # the same folder, computed in bf16 by a second server
    else:
        swap(world["models"], "tiny", world[change], [world["url"]])
    try:
        n, r = runs_to_alert(world, name, base_url=url)
    finally:
        if change != "bf16":
            swap(world["models"], "tiny", world["orig"], [world["url"]])
    assert n and n <= 2, r["tests"]
    d = r["details"]
    assert "logprob" in d["tests"] and d["prompts"]["logprob"]   # it names the prompts that moved
    assert d["prompts"]["logprob"][0]["input"] in [json.loads(x)["input"] for x in
                                                   world["suite"].read_text().splitlines()]
    assert d["fingerprints"]["now"] != d["fingerprints"]["baseline"]


def test_text_alone_detects_a_large_lora_adapter(world):
    name = start(world, "text-only", logprobs=False)
    swap(world["models"], "tiny", world["big-lora"], [world["url"]])
    try:
        n, r = runs_to_alert(world, name, most=3)
    finally:
        swap(world["models"], "tiny", world["orig"], [world["url"]])
    assert n and r["tests"]["logprob"]["p_value"] is None and "mmd" in r["details"]["tests"], r["tests"]


def unchanged_runs(world, name: str, runs: int) -> list[dict]:
    start(world, name)
    return [fmkit.monitor_run(name, workspace=world["root"]) for _ in range(runs)]


def test_an_unchanged_model_sampled_at_0_7_raises_no_alert(world):
    results = unchanged_runs(world, "steady", 50)
    assert not any(r["alert"] for r in results)
    assert all(r["tests"]["logprob"]["p_value"] == 1.0 for r in results)   # a deterministic server: exact ties
    assert len({r["summary"]["mean_chars"] for r in results}) > 1          # the samples do differ run to run


@pytest.mark.slow
def test_an_unchanged_model_raises_no_alert_over_200_runs(world):
    results = unchanged_runs(world, "steady-200", 200)
    assert not any(r["alert"] for r in results), [r["tests"] for r in results if r["alert"]]


class Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_an_alert_goes_to_stdout_a_file_and_a_webhook_and_exits_1(world, tmp_path):
    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    alerts = tmp_path / "alerts.jsonl"
    name = start(world, "cli", webhook=f"http://127.0.0.1:{hook.server_port}/alert", alert_file=str(alerts))
    cli = ["monitor", "run", name, "-w", str(world["root"])]
    steady = CliRunner().invoke(app, cli)
    assert steady.exit_code == 0 and "differs" not in steady.output, steady.output
    swap(world["models"], "tiny", world["lora"], [world["url"]])
    try:
        outs = [CliRunner().invoke(app, cli) for _ in range(2)]
    finally:
        swap(world["models"], "tiny", world["orig"], [world["url"]])
        hook.shutdown()
    alerted = [o for o in outs if o.exit_code == 1]
    assert alerted and all(o.exit_code in (0, 1) for o in outs), [o.output for o in outs]
    assert "differs from its baseline" in alerted[0].output and "canary" in alerted[0].output
    lines = [json.loads(x) for x in alerts.read_text().splitlines()]
    assert lines and Hook.received and Hook.received[-1]["run"] == lines[-1]["run"]
    rep = CliRunner().invoke(app, ["monitor", "report", name, "-w", str(world["root"]), "--json"])
    doc = json.loads(rep.output)
    assert rep.exit_code == 0 and len(doc["runs"]) >= 6 and doc["alerts"][-1]["delivered"]["webhook"] == 204
    assert "ALERT" in CliRunner().invoke(app, ["monitor", "report", name, "-w", str(world["root"])]).output


def test_a_local_folder_is_monitored_through_the_model_interface(world, tmp_path):
    suite = tmp_path / "c.jsonl"
    suite.write_text('{"input": "def main():", "reference": "("}\n{"input": "class Parser:"}\n')
    fmkit.monitor_init("local", str(world["orig"]), str(suite), samples=2, max_tokens=8, baseline_runs=2,
                       permutations=199, endpoint="completions", workspace=tmp_path)
    results = [fmkit.monitor_run("local", workspace=tmp_path) for _ in range(3)]
    last = results[-1]
    assert [r["baseline"] for r in results] == [True, True, False] and not last["alert"]
    assert last["tests"]["logprob"]["p_value"] == 1.0      # the whole text's log-likelihood, the same each run
    assert last["summary"]["samples"] == 4 and last["summary"]["scores"][1] is None
