"""`fmkit reward`: a scalar head trained by the Bradley-Terry loss beats chance on held-out pairs, and its folder is a
plain transformers sequence-classification model that `score` and transformers read alike."""
import json
import random

import pytest
import torch

from fmkit.evals.metrics import mcnemar

WORDS = "alpha beta gamma delta river stone cloud paper green light table water".split()


def preferences(n: int, seed: int) -> list[dict]:
    """Pairs of same-length word strings drawn alike, except that the chosen one says 'please' somewhere."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen, rejected = [rng.choice(WORDS) for _ in range(5)], [rng.choice(WORDS) for _ in range(6)]
        chosen.insert(rng.randrange(6), "please")
        rows.append({"prompt": f"Request {i}", "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return rows


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    (d / "train.jsonl").write_text("\n".join(map(json.dumps, preferences(96, 0))))
    (d / "held.jsonl").write_text("\n".join(map(json.dumps, preferences(40, 1))))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama, prefs):
    from fmkit.adapt.reward import reward

    out = tmp_path_factory.mktemp("rm") / "rm"
    return reward(llama, prefs / "train.jsonl", out, val_data=prefs / "held.jsonl", steps=20, batch_size=8, lr=1e-3,
                  workspace=out.parent / "ws", log_every=5)


def test_the_reward_model_beats_chance_on_held_out_pairs(trained, prefs):
    from fmkit.adapt.reward import score

    held = json.loads((trained / "fmkit.json").read_text())["heldout"]
    assert held["pairs"] == 40 and held["accuracy"] >= 0.8, held
    # the exact sign test of each pair's chosen against its rejected score, against a coin
    rows = [json.loads(line) for line in (prefs / "held.jsonl").read_text().splitlines()]
    chosen = score(trained, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = score(trained, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    test = mcnemar(rejected, chosen)
    assert test["b_only"] == held["wins"] and test["p_value"] < 1e-3, test
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert "val_accuracy" in metrics[-1] and metrics[-1]["step"] == 20


def test_the_folder_loads_in_transformers_with_the_same_scores(trained):
    from transformers import AutoModelForSequenceClassification

    from fmkit.adapt.reward import RewardModel

    rm = RewardModel(trained)
    net = AutoModelForSequenceClassification.from_pretrained(str(trained), use_safetensors=True).eval()
    assert net.config.num_labels == 1 and type(net).__name__ == "LlamaForSequenceClassification"
    prompt, answer = "Request 7", "alpha please river"
    ids = torch.tensor([rm.encode([{"role": "user", "content": prompt}], answer)])
    with torch.no_grad():
        plain = float(net(input_ids=ids).logits[0, 0])
    assert rm([prompt], [answer])[0] == pytest.approx(plain, abs=1e-5)
    m = json.loads((trained / "fmkit.json").read_text())
    assert m["task"] == "reward" and m["arch"] == "decoder" and m["kind"] == "model"


def test_a_lora_reward_model_on_an_encoder_is_saved_merged(tmp_path, tokenizer_dir, prefs):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    from fmkit.adapt.reward import reward, score
    from fmkit.models.io import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    encoder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
              ).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    out = reward(encoder, prefs / "train.jsonl", tmp_path / "rm", lora=True, holdout=0.25, steps=3, batch_size=4,
                 workspace=tmp_path / "ws")
    assert not (out / "adapter_config.json").exists()
    net = AutoModelForSequenceClassification.from_pretrained(str(out), use_safetensors=True)
    assert type(net).__name__ == "BertForSequenceClassification" and net.config.num_labels == 1
    assert json.loads((out / "fmkit.json").read_text())["heldout"]["pairs"] == 24
    scores = score(out, ["Request 1", "Request 1"], ["alpha please", "alpha beta"])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


def test_score_refuses_a_folder_that_is_no_reward_model(llama):
    from fmkit.adapt.reward import score
    from fmkit.errors import FmkitError

    with pytest.raises(FmkitError, match="not a reward model"):
        score(llama, ["p"], ["a"])
