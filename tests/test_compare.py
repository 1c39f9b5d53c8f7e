"""fmkit compare: paired statistics against hand-computed values, candidates and suites checked with file:line,
assertions, and a known-answer comparison of three candidates (a base model, its fine-tune, and the fine-tune
served over HTTP) that is resumable, picks under constraints, and renders in headless Chromium."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from fmkit.errors import FmkitError
from fmkit.select import stats

# ---- statistics -----------------------------------------------------------------------------------------------


def test_binomial_and_sign_test_match_hand_sums():
    # 8 trials, 1 success: 2 * (C(8,0) + C(8,1)) / 2^8 = 18/256
    assert stats.binomial_two_sided(1, 8) == pytest.approx(18 / 256)
    assert stats.binomial_two_sided(7, 8) == pytest.approx(18 / 256)
    assert stats.binomial_two_sided(4, 8) == 1.0 and stats.binomial_two_sided(0, 0) == 1.0
    s = stats.sign_test(2, 10)     # ties are not passed in: 12 untied items
    assert s["p_value"] == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2 ** 12)
    mc = stats.mcnemar([1, 1, 1, 0, 0, 1], [1, 0, 0, 0, 1, 0])
    assert (mc["a_only"], mc["b_only"]) == (3, 1) and mc["p_value"] == pytest.approx(2 * (1 + 4) / 16)


def test_holm_step_down():
    # sorted 0.01, 0.02, 0.03, 0.5 with m = 4: 0.04, 0.06, 0.06 (monotone), 0.5
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert stats.holm([0.04, 0.3]) == pytest.approx([0.08, 0.3]) and stats.holm([0.9, 0.8]) == [1.0, 1.0]
    assert stats.holm([]) == []


def test_wilson_interval_known_values():
    assert stats.wilson(5, 10) == pytest.approx([0.236593, 0.763407], abs=1e-5)
    lo, hi = stats.wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.277533, abs=1e-5)


def test_minimum_detectable_effects():
    n, psi = 100, 0.2
    d = stats.mde_paired_proportions(n, psi)
    # the defining equation holds at the solution: sqrt(n) d = z_a sqrt(psi) + z_b sqrt(psi - d^2)
    assert math.sqrt(n) * d == pytest.approx(1.959964 * math.sqrt(psi) + 0.841621 * math.sqrt(psi - d * d), abs=1e-6)
    assert 0.1 < d < 0.15
    assert stats.mde_paired_proportions(400, psi) < d                      # more items, smaller MDE
    same = stats.mde_paired_proportions(100, 0.0)                           # identical candidates: still finite
    assert 0 < same < 0.1
    assert stats.mde_paired_means(100, 2.0) == pytest.approx((1.959964 + 0.841621) * 2.0 / 10, abs=1e-5)
    assert stats.mde_paired_means(100, 0.0, 3.0, 4.0) == pytest.approx(2.801585 * 5.0 / 10, abs=1e-5)


def test_paired_bootstrap_interval_and_p_value():
    a = [0.1 * (i % 7) for i in range(80)]
    shifted = [x + 0.5 + 0.01 * (i % 3) for i, x in enumerate(a)]
    r = stats.paired_bootstrap(a, shifted, 2000, 0)
    assert r["diff"] == pytest.approx(0.5 + 0.01 * sum(i % 3 for i in range(80)) / 80)
    assert r["ci"][0] < r["diff"] < r["ci"][1] and r["ci"][1] - r["ci"][0] < 0.01
    assert r["p_value"] < 0.001
    assert stats.paired_bootstrap(a, a)["p_value"] == 1.0
    noise = stats.paired_bootstrap(a, [x + (0.05 if i % 2 else -0.05) for i, x in enumerate(a)])
    assert noise["p_value"] > 0.5 and noise["ci"][0] < 0 < noise["ci"][1]


# ---- candidates, suites and assertions -------------------------------------------------------------------------


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("candidates:\n  - model: a\n    temprature: 0\n", r"c\.yaml:3: .*'temprature'.*did you mean 'temperature'"),
    ("candidates:\n  - model: a\n  - {model: b, max_tokens: many}\n", r"c\.yaml:3: candidate field 'max_tokens'"),
    ("candidates:\n  - model: a\n   bad: [\n", r"c\.yaml:3: not valid YAML"),
    ("candidates:\n  - name: x\n", r"c\.yaml:2: candidate has no 'model:'"),
    ("candidates:\n  - {model: a, name: x}\n  - {model: b, name: x}\n", r"c\.yaml:3: two candidates are named"),
])
def test_bad_candidates_name_file_and_line(tmp_path, text, message):
    from fmkit.select.candidates import load_candidates

    with pytest.raises(FmkitError, match=message):
        load_candidates(write(tmp_path / "c.yaml", text))


def test_bad_suite_rows_are_listed_as_file_line(tmp_path):
    from fmkit.select.suite import load_suite

    rows = [json.dumps({"input": "ok", "assert": [{"contains": "x"}]}), "{broken",
            json.dumps({"input": "x", "assert": [{"startswith": "a"}]}), json.dumps({"input": ""}),
            json.dumps({"input": "y", "answer": "z"}), json.dumps({"input": "z", "assert": [{"regex": "("}]}),
            json.dumps({"input": "w", "assert": [{"python": "def check(:"}]})]
    p = write(tmp_path / "s.jsonl", "\n".join(rows) + "\n")
    with pytest.raises(FmkitError) as e:
        load_suite(str(p))
    msg = str(e.value)
    assert "6 bad row(s)" in msg and f"{p}:1:" not in msg
    assert f"{p}:2: invalid JSON" in msg and f"{p}:3: unknown assertion 'startswith'" in msg
    assert f"{p}:4: 'input' must be" in msg and f"{p}:5: unknown field 'answer'" in msg
    assert f"{p}:6: regex" in msg and f"{p}:7: python check has a syntax error" in msg


def test_user_mistakes_are_one_line_on_the_command_line(tmp_path):
    c = write(tmp_path / "c.yaml", "candidates:\n  - model: a\n    sytem: hi\n")
    s = write(tmp_path / "s.jsonl", json.dumps({"input": "x"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "fmkit", "compare", str(c), str(s), "-w", str(tmp_path / "ws")],
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"{c}:3" in lines[0] and "'system'" in lines[0], proc.stderr


def test_assertions_on_outputs():
    from fmkit.select.assertions import (failure_reason, parse_check, python_key, python_program, run_check,
                                         run_python, token_f1)

    def check(spec, output, **answer):
        c = parse_check(spec, "s.jsonl:1")
        jobs = {python_key(c, output, {}): (python_program(c, output, {}), 10)} if c.kind == "python" else {}
        return run_check(c, {"output": output, **answer}, run_python(jobs) if jobs else {}, {})

    assert check({"equals": "Paris"}, " Paris\n")["passed"]
    assert check({"equals": "paris", "ignore_case": True}, "Paris")["passed"]
    assert not check({"contains": ["a", "zz"]}, "abc")["passed"]
    assert check({"regex": r"^\d+$"}, "42")["passed"]
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    assert check({"json_schema": schema}, '```json\n{"n": 3}\n```')["passed"]
    bad = check({"json_schema": schema}, "n = 3")
    assert not bad["passed"] and bad["unparsable"] and failure_reason({"output": "n = 3"}, [bad]) == "unparsable"
    assert check({"python": "len(output) < 5"}, "abc")["passed"]
    assert not check({"python": "def check(output, row):\n    return int(output) > 5\n"}, "3")["passed"]
    raised = check({"python": "int(output) > 5"}, "not a number")
    assert not raised["passed"] and raised["unparsable"]
    assert check({"max_tokens": 5}, "x", completion_tokens=5)["passed"]
    assert not check({"latency_ms": 100}, "x", latency_ms=250.0)["passed"]
    assert check({"latency_ms": 100}, "x")["passed"] is None           # nothing measured: not judged
    with pytest.raises(FmkitError, match="s.jsonl:1: unknown assertion 'equal'"):
        parse_check({"equal": "x"}, "s.jsonl:1")
    assert failure_reason({"output": "I'm sorry, but I can't help with that."}, []) == "refusal"
    timed_out = {"output": None, "error": "openai:x: giving up after 6 attempts (APITimeoutError: timed out)"}
    assert failure_reason(timed_out, []) == "timeout"
    assert token_f1("the Blue sky", "blue sky!") == pytest.approx(0.8)


# ---- a comparison with a known answer --------------------------------------------------------------------------
from fmkit.providers import Model  # noqa: E402


class Judge(Model):
    """A judge that rates and prefers answers saying 'blue' (the fine-tune's learned answer)."""

    name = "judge"
    capabilities = frozenset({"chat"})

    def chat(self, requests):
        out = []
        for r in requests:
            text = r.prompt
            if "[[rating]]" in text:
                low = 1 + int(re.search(r"Item (\d+)", text).group(1)) % 3
                out.append("Rating: [[9]]" if "blue" in text.split("[Answer]")[1] else f"Rating: [[{low}]]")
                continue
            a = "blue" in text.split("[Answer A]")[1].split("[Answer B]")[0]
            b = "blue" in text.split("[Answer B]")[1]
            out.append("[[A]]" if a and not b else "[[B]]" if b and not a else "[[C]]")
        return out


N_ROWS, N_RUBRIC, N_TASK = 40, 6, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    """A base model, the same model fine-tuned to answer 'blue', a rows suite, a rubric suite and an eval task."""
    from conftest import save_fmkit_llama
    from fmkit.adapt.finetune import finetune

    root = tmp_path_factory.mktemp("compare")
    base = save_fmkit_llama(tokenizer_dir, root / "base", 128)
    train = write(root / "train.jsonl", "\n".join(json.dumps({"prompt": f"Item {i}: colour?", "completion": " blue."})
                                                 for i in range(40)))
    tuned = finetune(base, train, out=root / "tuned", steps=25, lr=3e-3, batch_size=8, template="none",
                     workspace=root / "ws")
    write(root / "colour.jsonl", "\n".join(json.dumps({"id": f"c{i}", "input": f"Item {100 + i}: colour?",
                                                       "reference": "blue",
                                                       "assert": [{"contains": "blue"}, {"max_tokens": 8}]})
                                           for i in range(N_ROWS)))
    write(root / "taste.jsonl", "\n".join(json.dumps({"input": f"Item {300 + i}: colour?",
                                                      "rubric": "Says the colour is blue."})
                                          for i in range(N_RUBRIC)))
    write(root / "task.jsonl", "\n".join(json.dumps({"n": 500 + i}) for i in range(N_TASK)))
    write(root / "colour_task.yaml", yaml.safe_dump({
        "task": "colour_task", "type": "generate_until", "dataset": {"path": "task.jsonl"},
        "doc_to_text": "Item {{n}}: colour?", "doc_to_target": "blue", "filters": [{"strip": True}],
        "generation": {"until": ["."], "max_tokens": 6}}))
    return root, base, tuned


def candidates_file(root, base, tuned, url):
    return write(root / "three.yaml", yaml.safe_dump({
        "defaults": {"max_tokens": 6, "stop": ["."], "chat": False},
        "candidates": [{"name": "base", "model": str(base)}, {"name": "tuned", "model": str(tuned)},
                       {"name": "served", "model": "openai:tuned", "base_url": url, "price": [1.0, 2.0]}]}))


def suites(root):
    return [str(root / "colour.jsonl"), str(root / "taste.jsonl"), str(root / "colour_task.yaml")]


@pytest.fixture(scope="module")
def run(setup):
    from fmkit.select.compare import compare
    from fmkit.server.launch import Background

    root, base, tuned = setup
    with Background(models=[str(tuned)], dtype="fp32") as url:
        cands = candidates_file(root, base, tuned, url)
        res = compare(str(cands), suites(root), out=str(root / "run"), prefer="cost", tolerance=0.02,
                      require=["latency_p95_ms<60000"], workspace=str(root / "ws"), judge_model=Judge())
    return root, res


def find(res, metric, a, b):
    return next(t for t in res["tests"] if t["metric"] == metric and {t["a"], t["b"]} == {a, b})


def test_a_learned_difference_is_significant_and_a_model_against_itself_is_not(run):
    root, res = run
    big = find(res, "colour/pass", "base", "tuned")
    assert big["test"] == "mcnemar" and big["n"] == N_ROWS
    assert big["b_value"] - big["a_value"] > 0.9 and big["p_value"] < 1e-9 and big["significant"]
    same = find(res, "colour/pass", "tuned", "served")      # the fine-tune, local and over HTTP, at temperature 0
    assert same["p_value"] == 1.0 and same["p_holm"] == 1.0 and not same["significant"]
    assert same["diff"] == 0 and 0 < same["mde"] < 0.25                       # what a null result could have missed
    rating = find(res, "taste/rubric", "base", "tuned")
    assert rating["test"] == "paired_bootstrap" and rating["significant"] and rating["ci"][0] > 5
    pref = find(res, "taste/preference", "base", "tuned")   # judged in both orders
    assert pref["test"] == "sign" and pref["a_wins"] == 0 and pref["b_wins"] == N_RUBRIC
    assert pref["p_value"] == pytest.approx(2 / 2 ** N_RUBRIC)
    task = find(res, "colour_task/exact_match", "base", "tuned")
    assert task["n"] == N_TASK and task["significant"]
    # Holm: every adjusted p is at least the raw one, and the smallest is multiplied by the number of tests
    m = len(res["tests"])
    assert all(t["p_holm"] >= t["p_value"] for t in res["tests"])
    smallest = min(res["tests"], key=lambda t: t["p_value"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, m * smallest["p_value"]))


def test_per_candidate_metrics_cost_latency_and_failures(run):
    root, res = run
    c = res["candidates"]
    assert c["base"]["metrics"]["colour/pass"]["value"] < 0.1 <= 0.9 < c["tuned"]["metrics"]["colour/pass"]["value"]
    lo, hi = c["tuned"]["metrics"]["colour/pass"]["ci"]
    assert lo < c["tuned"]["metrics"]["colour/pass"]["value"] <= hi <= 1.0
    assert c["tuned"]["metrics"]["taste/rubric"]["value"] == 9.0 and c["base"]["metrics"]["taste/rubric"]["value"] < 4
    assert c["tuned"]["cost"]["total"] == 0.0                                  # local, no price given
    served = c["served"]
    assert served["tokens"]["prompt"] > 0 and served["cost"]["total"] > 0
    rows = [json.loads(line) for line in (root / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (N_ROWS + N_RUBRIC + N_TASK)
    mine = [r for r in rows if r["candidate"] == "served" and r["suite"] != "colour_task"]
    assert sum(r["cost"] for r in mine) == pytest.approx(
        sum(r["prompt_tokens"] * 1.0 + r["completion_tokens"] * 2.0 for r in mine) / 1e6)
    for name in c:
        lat = c[name]["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"]
        assert c[name]["failures"]["total"] == 0
    by = {(r["candidate"], r["id"]): r["output"] for r in rows if r["suite"] == "colour"}
    assert all(by[("tuned", f"c{i}")] == by[("served", f"c{i}")] for i in range(N_ROWS))


def test_the_pick_is_the_cheapest_as_good_as_the_best_and_constraints_exclude(run):
    from fmkit.select.pick import choose

    root, res = run
    pick = res["pick"]
    assert pick["candidate"] == "tuned" and set(pick["as_good"]) == {"tuned", "served"}
    assert "cheapest" in " ".join(pick["why"])
    again = choose(res["candidates"], res["tests"], "colour/pass", ["cost_per_item>0"], "cost", 0.0)
    assert again["candidate"] == "served" and "cost_per_item" in again["excluded"]["tuned"]
    with pytest.raises(FmkitError, match="unknown field 'latency_p99_ms'"):
        choose(res["candidates"], res["tests"], "colour/pass", ["latency_p99_ms<5"], "cost", 0.0)
    front = {p["candidate"]: p["pareto"] for p in res["pareto"]}
    assert front["tuned"] or front["served"]          # best quality; base is on it only if it is the fastest


def test_pareto_front_and_latency_pick():
    from fmkit.select.pick import choose, pareto

    def summary(q, cost, p95):
        return {"metrics": {"s/pass": {"value": q, "higher_is_better": True}}, "cost": {"per_item": cost, "total": 0},
                "latency_ms": {"p50": p95 / 2, "p95": p95, "mean": p95 / 2}, "failures": {"rate": 0.0},
                "tokens": {"completion_per_item": 3.0}}

    s = {"big": summary(0.9, 0.01, 900.0), "mid": summary(0.88, 0.002, 400.0), "slow": summary(0.7, 0.003, 950.0),
         "tiny": summary(0.5, 0.0, 100.0)}
    assert {p["candidate"] for p in pareto(s, "s/pass") if p["pareto"]} == {"big", "mid", "tiny"}
    tests = [{"metric": "s/pass", "a": "big", "b": "mid", "significant": False, "p_holm": 0.4, "mde": 0.1, "n": 100},
             {"metric": "s/pass", "a": "big", "b": "tiny", "significant": True, "p_holm": 0.001, "mde": 0.1, "n": 100}]
    got = choose(s, tests, "s/pass", ["latency_p95_ms<1000"], "latency", 0.0)
    assert got["candidate"] == "mid" and got["as_good"] == ["big", "mid"]
    assert any("could have been missed" in w for w in got["why"])
    assert choose(s, tests, "s/pass", ["latency_p95_ms<500"], "quality", 0.0)["candidate"] == "mid"


def test_the_run_is_recorded_and_resumes_without_asking_again(run, setup):
    from fmkit.select.compare import compare
    from fmkit.workspace import registry

    root, res = run
    reg = registry(workspace=root / "ws")
    art = next(a for a in reg["artifacts"] if a["kind"] == "compare")
    assert art["path"] == str((root / "run").resolve()) and art["meta"]["pick"] == "tuned"
    assert any(r["kind"] == "compare" and r["status"] == "finished" for r in reg["runs"])
    from fmkit.select.answers import Store
    from fmkit.select.candidates import load_candidates
    from fmkit.select.suite import load_suite

    store = root / "run" / "answers.jsonl"
    lines = store.read_text().splitlines()
    # an interrupted run: half of the fine-tune's answers lost, and the line being written torn. The server is
    # gone, so an answer of the served candidate asked again would be a failure
    tuned = load_candidates(root / "three.yaml").candidates[1]
    lost = {Store.key(tuned.fingerprint(), "colour", i.id, i.input, i.vars)
            for i in load_suite(str(root / "colour.jsonl")).items[:N_ROWS // 2]}
    kept = [ln for ln in lines if json.loads(ln)["key"] not in lost]
    assert len(lines) - len(kept) == N_ROWS // 2
    store.write_text("\n".join(kept) + "\n" + lines[-1][:30])
    again = compare(str(root / "three.yaml"), suites(root), out=str(root / "run"), prefer="cost", tolerance=0.02,
                    workspace=str(root / "ws"), judge_model=Judge())
    assert all(s["failures"]["total"] == 0 for s in again["candidates"].values()), "asked the stopped server"
    after = [json.loads(ln)["key"] for ln in store.read_text().splitlines()]
    assert len(after) == len({json.loads(ln)["key"] for ln in kept}) + N_ROWS // 2   # only what was lost was asked
    assert set(after) >= lost
    assert again["candidates"]["tuned"]["metrics"] == res["candidates"]["tuned"]["metrics"]
    assert [t["p_value"] for t in again["tests"]] == [t["p_value"] for t in res["tests"]]


def lookup(doc, key: str):
    """results.json's value at a dotted data-key (candidate and metric names hold no dots here)."""
    parts, node = key.split("."), doc
    for p in parts:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node


def test_the_report_renders_in_chromium_and_its_numbers_match_results_json(run, tmp_path):
    root, res = run
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (apt-get install chromium, or `make setup` as root)"
    page = root / "run" / "report.html"
    text = page.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text   # self-contained
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "Paired tests" in dom and dom.count("<svg") >= len(res["metrics"]) + 2
    cells = re.findall(r'data-key="([^"]+)"[^>]*>([^<]*)<', dom)
    assert len(cells) > 50
    doc = json.loads((root / "run" / "results.json").read_text())
    for key, shown in cells:
        want = lookup(doc, key.replace("&amp;", "&"))
        if isinstance(want, str) or want is None:
            assert shown == str(want) or (want is None and shown == "n/a"), key
            continue
        if key.endswith(("p_value", "p_holm")):        # three significant digits
            assert float(shown) == pytest.approx(want, rel=5e-3, abs=1e-300), key
            continue
        digits = len(shown.split(".")[1]) if "." in shown else 0
        assert float(shown) == pytest.approx(want, abs=0.5 * 10 ** -digits + 1e-12), key
    assert 'data-key="pick.candidate">tuned<' in dom
    shot = tmp_path / "report.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_an_eval_suite_file_becomes_one_suite_per_task_and_attack_rates_are_lower_is_better():
    from fmkit.select.suite import load_suites
    from fmkit.select.summary import higher_is_better

    names = [s.name for s in load_suites(["redteam"])]
    assert len(names) == 5 and all(n.startswith("redteam_") for n in names)
    assert not higher_is_better("redteam_injection/attack_success_rate/injection")
    assert higher_is_better("redteam_jailbreak/refusal_rate") and higher_is_better("colour/pass")
