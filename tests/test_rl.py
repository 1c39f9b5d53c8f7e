"""`fmkit rl`: on a task whose start is poor (a random tiny decoder rarely says ' the' in 8 tokens), the held-out
reward rises significantly by an exact paired test while each answer's KL stays under the bound; a stopped and
resumed run ends where a straight one does; LoRA rollouts see the adapter; Python rewards run in the sandbox."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fmkit.evals.metrics import mcnemar

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Task {i}:"}) for i in range(40)))
    return path


def run_rl(llama, prompts, out, **kw):
    from fmkit.adapt.rl import rl

    settings = dict(reward="contains: the", data=prompts, holdout=0.25, group=8, batch_size=4, max_new_tokens=8,
                    steps=16, lr=1e-2, beta=0.01, kl_max=4.0, eval_samples=8, template="none",
                    workspace=out.parent / "ws", log_every=1)
    return rl(llama, out=out, **{**settings, **kw})


def test_rl_raises_the_held_out_reward_within_the_kl_bound(tmp_path, llama, prompts):
    out = run_rl(llama, prompts, tmp_path / "rl")
    held = json.loads((out / "fmkit.json").read_text())["heldout"]
    assert held["answers"] == 80 and held["reward_before"] < 0.1
    test = mcnemar(held["rewards_before"], held["rewards_after"])   # exact sign test, answer k against answer k
    assert held["reward_after"] > held["reward_before"] + 0.15 and test["p_value"] < 1e-3, (held, test)
    assert 0 < held["kl_after"] < 4.0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 16 and {"reward", "kl", "entropy", "length", "kl_capped"} <= set(log[-1])
    assert log[0]["kl"] == pytest.approx(0, abs=1e-5)   # the first rollout comes from the reference itself


def test_a_stopped_and_resumed_run_ends_where_a_straight_one_does(tmp_path, monkeypatch, llama, prompts):
    from fmkit.adapt.rollout import RolloutBatches
    from fmkit.train.loop import TrainingInterrupted

    short = dict(steps=4, group=4, batch_size=2, grad_accum=2, eval_samples=0)
    straight = run_rl(llama, prompts, tmp_path / "straight", **short)
    real_get = RolloutBatches.get

    def stop_at_step_2(self, step, micro):
        if step == 2:
            raise KeyboardInterrupt
        return real_get(self, step, micro)

    monkeypatch.setattr(RolloutBatches, "get", stop_at_step_2)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 2"):
        run_rl(llama, prompts, tmp_path / "resumed", **short)
    monkeypatch.undo()
    resumed = run_rl(llama, prompts, tmp_path / "resumed", resume=True, **short)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[(r["reward"], r["loss"]) for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines())]
            for o in (straight, resumed)]
    assert len(logs[0]) == 4 and logs[0] == logs[1]


def test_lora_rollouts_sample_from_the_adapted_weights(tmp_path, llama, prompts):
    from fmkit.adapt.rollout import plain_weights
    from fmkit.adapt.training import add_lora
    from fmkit.models.io import load_model

    net = add_lora(load_model(llama), ["q_proj", "v_proj"], 4, 8, seed=0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_()   # a trained adapter: B starts at zero
    weights = plain_weights(net)
    merged = net.merge_and_unload().state_dict()
    assert weights.keys() == merged.keys() and all(torch.allclose(weights[k], merged[k], atol=1e-6) for k in merged)

    out = run_rl(llama, prompts, tmp_path / "lora", lora=True, steps=2, group=2, batch_size=2, eval_samples=0)
    assert (out / "adapter_config.json").is_file()
    assert json.loads((out / "fmkit.json").read_text())["method"] == "rl lora"


def test_a_python_reward_runs_in_the_sandbox(tmp_path):
    from fmkit.adapt.reward_fns import resolve_reward

    (tmp_path / "check.py").write_text(
        "def passes(prompt, answer, expected):\n"
        "    scope = {}\n"
        "    exec(answer, scope)   # the model's code\n"
        "    return float(scope['f'](2) == expected)\n")
    fn = resolve_reward(f"{tmp_path / 'check.py'}:passes", timeout=3)
    answers = ["def f(x): return x * 2", "def f(x): return x", "import os\nos._exit(0)",
               "import shutil\nshutil.rmtree('" + str(tmp_path) + "')\ndef f(x): return 4", "while True: pass"]
    scores = fn(["double it"] * len(answers), answers, [{"expected": 4}] * len(answers))
    assert scores[:2] == [1.0, 0.0] and all(math.isnan(s) for s in scores[2:]), scores
    assert (tmp_path / "check.py").exists()   # the sandbox refused the deletion


@pytest.mark.parametrize("spec, answers, want", [
    ("json", ['{"a": 1}', "[1, 2]", "1", "{oops"], [1.0, 1.0, 0.0, 0.0]),
    ("length:4", ["abcd", "ab", "abcdefgh", ""], [1.0, 0.5, 0.0, 0.0]),
    ("contains:ok", ["it is ok", "OK", "", "ok"], [1.0, 0.0, 0.0, 1.0]),
])
def test_built_in_rules_score_the_answer_text(spec, answers, want):
    from fmkit.adapt.reward_fns import resolve_reward

    assert resolve_reward(spec)([""] * len(answers), answers, [{}] * len(answers)) == want


@pytest.mark.parametrize("spec, message", [
    ("length:0", "length:N takes a whole number"),
    ("nothing-like-this", "is none of"),
    ("missing.py", "no such file"),
])
def test_a_reward_that_names_nothing_is_one_sentence(spec, message):
    from fmkit.adapt.reward_fns import resolve_reward
    from fmkit.errors import FmkitError

    with pytest.raises(FmkitError, match=message):
        resolve_reward(spec)
