"""`fmkit adapt auto`: the ladder on a case whose answer is known. The task's gold answer is always the word
"zebra", which a freshly initialised model has no reason to prefer, and which a LoRA adapter learns from a few
dozen examples: the ladder climbs past the prompting rungs, LoRA reaches the target significantly, and the costlier
rungs are not run."""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import save_fmkit_llama

import fmkit

THINGS = ["door", "vault", "gate", "safe", "box", "room", "chest", "locker", "cabinet", "drawer"]
PLACES = ["north tower", "old mill", "harbour", "library", "market", "station", "garden", "castle"]


def question(n: int) -> str:
    return f"Q: what opens the {THINGS[n % len(THINGS)]} in the {PLACES[n // len(THINGS) % len(PLACES)]}?\nA:"


@pytest.fixture(scope="module")
def case(tmp_path_factory, tokenizer_dir, one_thread):
    root = tmp_path_factory.mktemp("ladder")
    # held out: the first 40 questions; answers are generated (greedy, first word), so no choice's length in
    # tokens can decide the score, as summed log-likelihoods would for a model this nearly uniform
    items = [{"id": f"q{n}", "question": question(n), "answer": "zebra"} for n in range(40)]
    (root / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (root / "task.yaml").write_text("task: password\ntype: generate_until\ndataset: {path: items.jsonl}\n"
                                    "doc_to_text: '{{question}}'\ndoc_to_target: answer\ndoc_to_id: id\n"
                                    "generation: {until: ['\\n'], max_tokens: 4}\nfilters: [{regex: '(\\w+)'}]\n")
    (root / "train.jsonl").write_text("".join(json.dumps({"prompt": question(n), "completion": " zebra"}) + "\n"
                                              for n in range(40, 80)))
    docs = root / "docs"
    docs.mkdir()
    (docs / "keys.md").write_text("# Keys\n\nEvery door, vault and gate opens with the word zebra.\n")
    model = save_fmkit_llama(tokenizer_dir, root / "base", 128)
    return {"root": root, "model": model, "task": root / "task.yaml", "train": root / "train.jsonl", "docs": docs}


def test_the_ladder_climbs_to_lora_and_stops_there(case):
    doc = fmkit.adapt_auto(str(case["model"]), str(case["task"]), train=case["train"], docs=case["docs"],
                           target="exact_match>=0.7", name="zebra", lora_steps=80, workspace=case["root"] / "ws")
    rungs = {r["rung"]: r for r in doc["rungs"]}
    assert [r["rung"] for r in doc["rungs"]] == ["zero-shot", "few-shot", "RAG", "LoRA", "full fine-tune",
                                                 "continued pre-training"]
    assert rungs["zero-shot"]["value"] < 0.7 and not rungs["zero-shot"]["target_reached"]
    assert rungs["LoRA"]["target_reached"] and rungs["LoRA"]["ci"][0] >= 0.7
    assert rungs["LoRA"]["mcnemar"]["p_value"] < 0.05 and rungs["LoRA"]["tokens"]["training"] > 0
    for later in ("full fine-tune", "continued pre-training"):
        assert rungs[later]["status"] == "not run" and "target" in rungs[later]["reason"]
    assert doc["target_reached"] and doc["chosen"]["rung"] == "LoRA" and doc["chosen"]["kind"] == "adapter"
    run = case["root"] / "ws" / "ladders" / "zebra"
    saved = json.loads((run / "results.json").read_text())
    assert saved["chosen"]["artifact"] == rungs["LoRA"]["artifact"]
    assert (run / "ladder.png").stat().st_size > 1000
    assert (run / "artifacts" / "lora" / "adapter_config.json").is_file()
    arts = fmkit.registry(workspace=case["root"] / "ws")["artifacts"]
    assert any(a["meta"].get("name") == "zebra-chosen" and a["kind"] == "adapter" for a in arts)


def test_a_remote_base_runs_only_the_prompting_rungs(case, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(case["model"], models / "tiny")
    with fmkit.Server(models_dir=str(models), dtype="fp32") as url:
        doc = fmkit.adapt_auto("openai:tiny", str(case["task"]), train=case["train"], docs=case["docs"],
                               base_url=url, limit=8, name="remote", price_as="openai:gpt-4o-mini",
                               workspace=tmp_path / "ws")
    rungs = {r["rung"]: r for r in doc["rungs"]}
    assert all(rungs[r]["status"] == "done" for r in ("zero-shot", "few-shot", "RAG")), doc["rungs"]
    for r in ("LoRA", "full fine-tune", "continued pre-training"):
        assert rungs[r]["status"] == "skipped" and "remote model" in rungs[r]["reason"]
    assert rungs["zero-shot"]["tokens"]["eval_prompt"] > 0 and rungs["zero-shot"]["cost_usd"] > 0
    assert doc["chosen"]["kind"] in ("prompt", "rag-index")


def test_bad_target_syntax_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "fmkit", "adapt", "auto", "m", "t.yaml", "--target",
                           "exact_match=0.8"], check=False, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--target must look like METRIC>=X" in lines[0], proc.stderr


def test_targets_and_budgets_parse_or_name_the_flag():
    from fmkit.select.ladder import parse_budget, parse_target

    assert parse_target("acc >= 0.8") == ("acc", 0.8) and parse_target("") is None
    assert parse_budget("90s") == 90 and parse_budget("20m") == 1200 and parse_budget("1.5h") == 5400
    for bad in ("acc>0.8", "0.8", "acc>=high"):
        with pytest.raises(fmkit.FmkitError, match="--target"):
            parse_target(bad)
    with pytest.raises(fmkit.FmkitError, match="--budget"):
        parse_budget("soon")
