"""Metric definitions, each with its standard error.

Multiple choice follows lm-evaluation-harness: `acc` is argmax of the log-likelihoods; `acc_norm` divides each by
the choice's length in characters; `acc_bytes` by its UTF-8 bytes; `acc_token` (HELM) by its tokens;
`acc_mutual_info` subtracts the choice's log-likelihood with no context. Means get the sample standard
deviation / sqrt(n) as standard error; other aggregates (ECE, pass@k over items) are bootstrapped.
"""
from __future__ import annotations

import math
import re
import string

import numpy as np

MC_METRICS = ("acc", "acc_norm", "acc_bytes", "acc_token", "acc_mutual_info", "is_greedy", "brier")
GEN_METRICS = ("exact_match",)
CODE_METRICS = ("pass@k",)
PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
JUDGE_METRICS = ("rating", "win_rate", "tie_rate", "loss_rate")
REDTEAM_METRICS = ("attack_success_rate", "refusal_rate")


def mc_scores(lls: list[float], choices: list[str], gold: int, tokens: list[int], greedy: list[bool],
              unconditional: list[float] | None = None) -> dict:
    lls_a = np.array(lls, dtype=np.float64)
    chars = np.array([max(1, len(c)) for c in choices], dtype=np.float64)
    nbytes = np.array([max(1, len(c.encode())) for c in choices], dtype=np.float64)
    ntok = np.array([max(1, t) for t in tokens], dtype=np.float64)
    probs = np.exp(lls_a - lls_a.max())
    probs /= probs.sum()
    out = {
        "acc": float(np.argmax(lls_a) == gold),
        "acc_norm": float(np.argmax(lls_a / chars) == gold),
        "acc_bytes": float(np.argmax(lls_a / nbytes) == gold),
        "acc_token": float(np.argmax(lls_a / ntok) == gold),
        "is_greedy": float(greedy[gold]),
        "brier": float(((probs - np.eye(len(lls))[gold]) ** 2).sum()),
        "_confidence": float(probs.max()),
        "_prob_gold": float(probs[gold]),
    }
    if unconditional is not None:
        out["acc_mutual_info"] = float(np.argmax(lls_a - np.array(unconditional)) == gold)
    return out


def exact_match(pred: str, ref: str, ignore_case: bool = False, ignore_punctuation: bool = False,
                regexes_to_ignore: list | tuple = ()) -> float:
    """Hugging Face evaluate's exact_match: regexes removed from both sides, then case and punctuation."""
    for rx in regexes_to_ignore:
        pred, ref = re.sub(rx, "", pred), re.sub(rx, "", ref)
    if ignore_case:
        pred, ref = pred.lower(), ref.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        pred, ref = pred.translate(table), ref.translate(table)
    return float(pred == ref)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_stderr(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes in n (95% by default): unlike mean +- 1.96 se it stays inside [0, 1]
    and is not empty at 0/n or n/n, which is where attack success rates often are."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n and n/n the bound is exactly 0 or 1, which floating point misses by an ulp
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def bootstrap_stderr(fn, data: list, iters: int = 1000, seed: int = 0) -> float:
    if len(data) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = len(data)
    stats = [fn([data[i] for i in rng.integers(0, n, n)]) for _ in range(iters)]
    return float(np.std(stats, ddof=1))


def ece(confidence: list[float], correct: list[float], bins: int = 10) -> float:
    """Expected calibration error with equal-mass bins (HELM): sorted by confidence, cut into `bins` groups of
    (nearly) equal size; mean |accuracy - confidence| weighted by group size. bins=1 is the 1-bin ECE."""
    if not confidence:
        return float("nan")
    order = np.argsort(confidence, kind="stable")
    conf = np.asarray(confidence)[order]
    corr = np.asarray(correct)[order]
    total = 0.0
    for part in np.array_split(np.arange(len(conf)), min(bins, len(conf))):
        if len(part):
            total += len(part) * abs(corr[part].mean() - conf[part].mean())
    return float(total / len(conf))


def perplexities(rows: list[dict]) -> dict:
    """lm-eval's corpus-level word/byte perplexity and bits per byte, from per-document (ll, words, bytes)."""
    ll = sum(r["ll"] for r in rows)
    words = sum(r["words"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    return {"word_perplexity": math.exp(-ll / max(1, words)), "byte_perplexity": math.exp(-ll / max(1, nbytes)),
            "bits_per_byte": -ll / max(1, nbytes) / math.log(2)}


def mcnemar(a: list[float], b: list[float]) -> dict:
    """Exact McNemar test for two methods scored 0/1 on the same items: two-sided binomial p-value over the
    discordant pairs (items one method gets right and the other wrong)."""
    b_only = sum(1 for x, y in zip(a, b) if y > x)
    a_only = sum(1 for x, y in zip(a, b) if x > y)
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}
