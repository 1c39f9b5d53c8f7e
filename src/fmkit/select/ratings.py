"""Ratings from pairwise votes: Bradley–Terry on the Elo scale, with bootstrap intervals, a win-rate matrix, a
position-bias check and an optional length control.

Bradley–Terry: P(a beats b) = 1 / (1 + exp(-(β_a - β_b))). β is fitted by maximum likelihood as a logistic
regression without intercept (a vote is a row with +1 for the model shown as A and -1 for B). A tie, and "both
bad", counts as half a win for each side, as Chatbot Arena does. Ratings are `1000 + 400 / ln 10 · β`, centred so
the mean rating is 1000: a 400-point gap means 10:1 odds. A tiny ridge (1e-6) keeps the fit defined when a model
has won or lost every vote; it moves ratings by far less than their intervals.

Length control (Chatbot Arena's style control): one more covariate, the normalised length difference
(len_A - len_B) / (len_A + len_B), fitted together with β, so a model is not rated up only for longer answers;
its coefficient says how much length sways the voters.

Intervals: percentile bootstrap over votes (resampled with replacement, refitted). Position bias: among decisive
votes, whether the left answer wins more often than half (exact two-sided binomial test).
"""
from __future__ import annotations

import math

import numpy as np

from .stats import binomial_two_sided

SCALE = 400 / math.log(10)
OUTCOMES = ("a", "b", "tie", "both_bad")


def _design(votes: list[dict], models: list[str], length_control: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (one per vote, two for a tie), targets (1: A won) and weights."""
    index = {m: i for i, m in enumerate(models)}
    rows, ys, ws = [], [], []
    for v in votes:
        x = np.zeros(len(models) + int(length_control))
        x[index[v["model_a"]]] += 1.0
        x[index[v["model_b"]]] -= 1.0
        if length_control:
            la, lb = len(v.get("answer_a") or ""), len(v.get("answer_b") or "")
            x[-1] = (la - lb) / max(1, la + lb)
        if v["winner"] in ("a", "b"):
            rows.append(x)
            ys.append(1.0 if v["winner"] == "a" else 0.0)
            ws.append(1.0)
        else:   # tie or both bad: half a win each way
            rows += [x, x]
            ys += [1.0, 0.0]
            ws += [0.5, 0.5]
    return np.array(rows), np.array(ys), np.array(ws)


def _fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float = 1e-6, iters: int = 50) -> np.ndarray:
    """Weighted logistic regression without intercept by Newton's method."""
    beta = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        grad = x.T @ (w * (y - p)) - ridge * beta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return beta


def bradley_terry(votes: list[dict], models: list[str] | None = None, length_control: bool = False) -> dict:
    """{model: rating} (and "length_coefficient" with length control) from votes
    `{"model_a", "model_b", "winner": a | b | tie | both_bad, "answer_a", "answer_b"}`."""
    models = models or sorted({v["model_a"] for v in votes} | {v["model_b"] for v in votes})
    x, y, w = _design(votes, models, length_control)
    beta = _fit(x, y, w) if len(y) else np.zeros(len(models) + int(length_control))
    strengths = beta[:len(models)] - beta[:len(models)].mean()
    out = {"ratings": {m: float(1000 + SCALE * s) for m, s in zip(models, strengths, strict=True)}}
    if length_control:
        out["length_coefficient"] = float(beta[-1])
    return out


def ratings(votes: list[dict], length_control: bool = False, bootstrap: int = 200, seed: int = 0) -> dict:
    """Ratings with 95% bootstrap intervals, vote counts, the win-rate matrix and the position-bias check."""
    for i, v in enumerate(votes):
        if v.get("winner") not in OUTCOMES:
            raise ValueError(f"vote {i}: winner must be one of {', '.join(OUTCOMES)}, got {v.get('winner')!r}")
    models = sorted({v["model_a"] for v in votes} | {v["model_b"] for v in votes})
    point = bradley_terry(votes, models, length_control)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap if votes else 0):
        sample = [votes[i] for i in rng.integers(0, len(votes), len(votes))]
        draws.append(bradley_terry(sample, models, length_control)["ratings"])
    table = []
    for m in models:
        values = sorted(d[m] for d in draws)
        lo, hi = (values[int(0.025 * (len(values) - 1))], values[int(math.ceil(0.975 * (len(values) - 1)))]) \
            if values else (float("nan"), float("nan"))
        table.append({"model": m, "rating": point["ratings"][m], "ci": [lo, hi],
                      "votes": sum(m in (v["model_a"], v["model_b"]) for v in votes)})
    table.sort(key=lambda r: -r["rating"])
    return {"ratings": table, "length_coefficient": point.get("length_coefficient"),
            "win_rates": win_rates(votes, models), "position_bias": position_bias(votes), "votes": len(votes)}


def win_rates(votes: list[dict], models: list[str]) -> dict:
    """{a: {b: share of a's votes against b that a won (ties half), or None}}."""
    won = {a: {b: 0.0 for b in models} for a in models}
    seen = {a: {b: 0 for b in models} for a in models}
    for v in votes:
        a, b = v["model_a"], v["model_b"]
        score = {"a": 1.0, "b": 0.0}.get(v["winner"], 0.5)
        won[a][b] += score
        won[b][a] += 1 - score
        seen[a][b] += 1
        seen[b][a] += 1
    return {a: {b: (won[a][b] / seen[a][b] if seen[a][b] else None) for b in models if b != a} for a in models}


def position_bias(votes: list[dict]) -> dict:
    """Whether the left answer (A) wins decisive votes more often than half: counts and the exact p-value."""
    left = sum(v["winner"] == "a" for v in votes)
    right = sum(v["winner"] == "b" for v in votes)
    n = left + right
    return {"left_wins": left, "right_wins": right, "left_share": left / n if n else None,
            "p_value": binomial_two_sided(min(left, right), n) if n else 1.0}
