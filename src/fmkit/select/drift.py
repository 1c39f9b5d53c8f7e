"""Tests of "is this still the same model": each compares one new run with the baseline runs and returns a valid
p-value, and a CUSUM over those p-values turns repeated runs into one alarm with a bounded false-alarm rate.

Every test here is a permutation test. Under the null hypothesis (the model did not change) the observations of
the new run and those of the baseline runs are exchangeable, so relabelling which ones are "new" leaves the
statistic's distribution unchanged. The Monte Carlo p-value (1 + #{relabellings whose statistic >= the observed
one}) / (1 + permutations) then satisfies P(p <= u) <= u for every u, whatever the number of permutations, and a
fixed seed makes it reproducible. Relabelling happens within each prompt (a stratified permutation), so prompts of
different difficulty never mix, and each prompt also gets its own p-value from the same relabellings, which is how
an alert names the prompts that moved.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..evals.metrics import mcnemar

GRID = 1e6         # log-probabilities are compared on a grid of 1e-6 nats, in integers, so equal is exactly equal
TIE = 1e-12        # MMD statistics closer than this count as tied (kernel sums of identical strings round)
KAPPA = 0.1        # the p-to-e calibrator's exponent in the CUSUM (see cusum_step)


@dataclass
class Result:
    test: str
    p_value: float
    statistic: float
    prompts: dict = field(default_factory=dict)   # prompt index -> that prompt's own p-value
    detail: dict = field(default_factory=dict)


def relabellings(rng: np.random.Generator, n: int, k: int, permutations: int) -> np.ndarray:
    """(1 + permutations, n) 0/1 rows with k ones each: row 0 is the observed labelling (the last k are new), the
    others are uniformly random relabellings."""
    order = rng.random((permutations, n)).argsort(axis=1)[:, :k]
    masks = np.zeros((permutations + 1, n))
    masks[0, n - k:] = 1
    np.put_along_axis(masks[1:], order, 1, axis=1)
    return masks


def p_value(stats: np.ndarray, tie: float = 0.0) -> float:
    """The Monte Carlo permutation p-value of stats[0] among stats[1:] (ties count against the change)."""
    return float((1 + np.sum(stats[1:] >= stats[0] - tie)) / len(stats))


def logprob_test(prompts: list[tuple[list[dict], list[dict]]], permutations: int = 9999, seed: int = 0) -> Result:
    """Log-probability tracking: did the log-probabilities the model gives fixed prompts move?

    Each prompt i has baseline requests and new requests, each a map {token: log-probability} (the fixed text's
    own tokens scored with `echo`, or the first reply token's top alternatives); a token a request lacks takes
    that request's lowest value, as it ranked below all of them. The statistic is
    sum_i mean_t (mean_new[i, t] - mean_base[i, t])^2 over the union of tokens t, and the p-value is that of the
    stratified permutation test (module docstring). False-alarm rate: P(p <= alpha) <= alpha for an unchanged
    model whose requests are exchangeable across runs. A server that answers identically every time gives exact
    ties, so an unchanged one gets p = 1 and any change at all of 1e-6 nats or more gets the smallest p-value.
    """
    rng = np.random.default_rng(seed)
    total, per, effects = np.zeros(permutations + 1), {}, {}   # effects: root-mean-square change in nats
    for i, (base, new) in enumerate(prompts):
        if not base or not new:
            continue
        rows = base + new
        keys = sorted(set().union(*rows))
        x = np.array([[round(r.get(t, min(r.values())) * GRID) for t in keys] for r in rows], dtype=np.float64)
        n, k = len(rows), len(new)
        sums = relabellings(rng, n, k, permutations) @ x    # integers below 2**53: exact
        diff = (sums * n - x.sum(0) * k) / (k * (n - k) * GRID)   # mean_new - mean_base, exactly 0 when equal
        stats = (diff ** 2).mean(1)
        per[i], effects[i] = p_value(stats), float(np.sqrt(stats[0]))
        total += stats
    if not per:
        return Result("logprob", 1.0, 0.0, detail={"skipped": "no prompt has log-probabilities in both"})
    return Result("logprob", p_value(total), float(total[0]), per, {"effects": effects})


# ---- maximum mean discrepancy over sampled text -------------------------------------------------------------------
def ngram_kernel(texts: list[str], n: int = 3) -> np.ndarray:
    """Cosine similarity of character n-gram counts (a spectrum kernel); texts are padded so even short ones have
    n-grams, and the empty text is its own point."""
    grams = [Counter(p[j:j + n] for j in range(len(p) - n + 1)) for p in ("\x02" * (n - 1) + t + "\x03" for t in texts)]
    vocab = {g: j for j, g in enumerate(sorted(set().union(*grams)))}
    x = np.zeros((len(texts), len(vocab)))
    for i, c in enumerate(grams):
        for g, v in c.items():
            x[i, vocab[g]] = v
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def hamming_kernel(texts: list[str], length: int = 256) -> np.ndarray:
    """The Hamming kernel of Gao et al. (2025) on characters: the fraction of the first `length` positions at which
    two texts hold the same character, both padded to the longest (at most `length`) with an end mark."""
    width = max(1, min(length, max(len(t) for t in texts)))
    codes = np.full((len(texts), width), -1, dtype=np.int64)
    for i, t in enumerate(texts):
        codes[i, :min(len(t), width)] = [ord(c) for c in t[:width]]
    return (codes[:, None, :] == codes[None, :, :]).mean(-1)


KERNELS = {"ngram": ngram_kernel, "hamming": hamming_kernel}


def mmd_test(prompts: list[tuple[list[str], list[str]]], kernel: str = "ngram", permutations: int = 9999,
             seed: int = 0) -> Result:
    """Two-sample test on sampled outputs when only text is available (Model Equality Testing, Gao et al. 2025).

    For prompt i, with m baseline samples X and k new samples Y, MMD_i^2 = mean K(X, X) + mean K(Y, Y) -
    2 mean K(X, Y) (the biased estimate) under a string kernel K (`ngram`: character 3-gram cosine; `hamming`:
    the paper's positionwise-equality kernel on characters). The statistic is sum_i MMD_i^2 and the p-value that of
    the stratified permutation test (module docstring). False-alarm rate: P(p <= alpha) <= alpha for an unchanged
    model when samples are exchangeable across runs (sampled independently, at the same settings).
    """
    rng = np.random.default_rng(seed)
    total, per, effects = np.zeros(permutations + 1), {}, {}   # effects: each prompt's MMD^2
    for i, (base, new) in enumerate(prompts):
        if not base or not new:
            continue
        gram = KERNELS[kernel](list(base) + list(new))
        n, k = gram.shape[0], len(new)
        masks = relabellings(rng, n, k, permutations)
        w = (masks * n - k) / (k * (n - k))      # +1/k on new samples, -1/(n-k) on baseline ones
        stats = np.einsum("pi,ij,pj->p", w, gram, w, optimize=True)
        per[i], effects[i] = p_value(stats, TIE), float(stats[0])
        total += stats
    if not per:
        return Result("mmd", 1.0, 0.0, detail={"skipped": "no prompt has samples in both"})
    return Result("mmd", p_value(total, TIE * len(per)), float(total[0]), per, {"kernel": kernel, "effects": effects})


# ---- task scores --------------------------------------------------------------------------------------------------
def task_test(pairs: list[tuple[int, float, float]]) -> Result:
    """Task-score test: exact McNemar over (prompt, baseline score, new score) pairs of 0/1 scores.

    Each new sample is paired with the same prompt's sample of the same index in one baseline run, so under the
    null the two scores of a pair are independent draws of the same Bernoulli and a discordant pair is as likely
    one way as the other; the two-sided binomial p-value over discordant pairs then has P(p <= alpha) <= alpha.
    Per-prompt p-values are the same test over that prompt's pairs.
    """
    if not pairs:
        return Result("mcnemar", 1.0, 0.0, detail={"skipped": "no scored prompts"})
    base, new = [b for _, b, _ in pairs], [x for _, _, x in pairs]
    m = mcnemar(base, new)
    per = {}
    for i in sorted({p for p, _, _ in pairs}):
        mine = [(b, x) for p, b, x in pairs if p == i]
        per[i] = mcnemar([b for b, _ in mine], [x for _, x in mine])["p_value"]
    return Result("mcnemar", m["p_value"], float(m["b_only"] - m["a_only"]), per,
                  {"worse": m["a_only"], "better": m["b_only"], "baseline": float(np.mean(base)),
                   "now": float(np.mean(new))})


# ---- the sequential rule over runs --------------------------------------------------------------------------------
def cusum_step(previous: float, p: float, kappa: float = KAPPA) -> float:
    """S_n = max(0, S_{n-1} + log e_n) with e_n = kappa * p_n^(kappa - 1), a p-to-e calibrator.

    For a p-value with P(p <= u) <= u, E[e_n] <= 1; an unchanged model's runs drift S down (E log e_n =
    log kappa + 1 - kappa < 0) while repeated small p-values push it up. See `threshold` for the bound.
    """
    return max(0.0, previous + math.log(kappa) + (kappa - 1) * math.log(max(p, 1e-300)))


def threshold(alpha: float, horizon: int, tests: int) -> float:
    """The CUSUM alarm level h = log(horizon * tests / alpha).

    The CUSUM passes h by run N only if, for some start j <= N, the product of e-values from run j on reaches e^h.
    Each such product is a nonnegative supermartingale from 1 when every p-value is valid given the runs before
    it, so by Ville's inequality it ever reaches e^h with probability at most e^-h; over N starts and `tests`
    tests, the chance of any false alarm within N = horizon runs is at most horizon * tests * e^-h = alpha.
    """
    return math.log(horizon * tests / alpha)
