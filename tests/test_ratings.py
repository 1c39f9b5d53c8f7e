"""Bradley–Terry ratings on simulated voters with known strengths: the order and the intervals recover the truth;
the position-bias check and the length control see what was planted."""
from __future__ import annotations

import math

import numpy as np

from fmkit.select.ratings import SCALE, bradley_terry, ratings

TRUE = {"alpha": 0.0, "beta": 0.4, "gamma": 0.9, "delta": 1.6}   # Bradley-Terry strengths (logits)


def simulate(n, seed=0, left_bonus=0.0, length_bonus=0.0, long_model=None, ties=0.0):
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    votes = []
    for _ in range(n):
        a, b = rng.choice(names, 2, replace=False)
        # lengths vary for every model (so the length effect can be told apart from strength); one may run long
        la = int(rng.integers(50, 400)) + (300 if a == long_model else 0)
        lb = int(rng.integers(50, 400)) + (300 if b == long_model else 0)
        logit = TRUE[a] - TRUE[b] + left_bonus + length_bonus * (la - lb) / (la + lb)
        if rng.random() < ties:
            winner = "tie" if rng.random() < 0.5 else "both_bad"
        else:
            winner = "a" if rng.random() < 1 / (1 + math.exp(-logit)) else "b"
        votes.append({"model_a": a, "model_b": b, "winner": winner, "answer_a": "x" * la, "answer_b": "y" * lb})
    return votes


def truth():
    mean = np.mean(list(TRUE.values()))
    return {m: 1000 + SCALE * (s - mean) for m, s in TRUE.items()}


def test_ratings_recover_known_strengths():
    out = ratings(simulate(3000), bootstrap=100)
    assert [r["model"] for r in out["ratings"]] == ["delta", "gamma", "beta", "alpha"]
    covered = sum(r["ci"][0] <= truth()[r["model"]] <= r["ci"][1] for r in out["ratings"])
    assert covered >= 3   # 95% intervals: all four cover the truth most of the time
    for r in out["ratings"]:
        assert abs(r["rating"] - truth()[r["model"]]) < 40 and r["ci"][1] - r["ci"][0] < 120
    assert abs(np.mean([r["rating"] for r in out["ratings"]]) - 1000) < 1e-6
    wr = out["win_rates"]
    assert wr["delta"]["alpha"] > 0.75 and abs(wr["delta"]["alpha"] + wr["alpha"]["delta"] - 1) < 1e-9


def test_ties_and_both_bad_count_half_a_win_each():
    votes = [{"model_a": "x", "model_b": "y", "winner": "a"}] * 2 + [
        {"model_a": "x", "model_b": "y", "winner": w} for w in ("tie", "both_bad")]
    r = bradley_terry(votes)["ratings"]   # x: 3 of 4 wins -> odds 3:1
    assert abs((r["x"] - r["y"]) - SCALE * math.log(3)) < 1
    assert ratings(simulate(500, ties=0.3), bootstrap=0)["ratings"][0]["model"] == "delta"


def test_a_400_point_gap_is_ten_to_one_odds():
    votes = [{"model_a": "x", "model_b": "y", "winner": "a"}] * 10 + [{"model_a": "x", "model_b": "y",
                                                                        "winner": "b"}]
    r = bradley_terry(votes)["ratings"]
    assert abs((r["x"] - r["y"]) - 400) < 1


def test_position_bias_is_seen_only_where_planted():
    fair = ratings(simulate(2000, seed=1), bootstrap=0)["position_bias"]
    biased = ratings(simulate(2000, seed=1, left_bonus=0.6), bootstrap=0)["position_bias"]
    assert fair["p_value"] > 0.01 and biased["p_value"] < 1e-6 and biased["left_share"] > 0.55


def test_length_control_removes_a_length_advantage():
    votes = simulate(4000, seed=2, length_bonus=3.0, long_model="alpha")
    plain = bradley_terry(votes)["ratings"]
    controlled = bradley_terry(votes, length_control=True)
    assert plain["alpha"] - truth()["alpha"] > 60                      # rated up for being long
    assert abs(controlled["ratings"]["alpha"] - truth()["alpha"]) < 40   # not with the covariate
    assert abs(controlled["length_coefficient"] - 3.0) < 0.8
