"""Paired statistics for comparing two candidates scored on the same items, and intervals for one candidate.

Every test here is two-sided, at alpha = 0.05 where a level is needed, and takes the two candidates' scores on the
same items in the same order. scipy is not a dependency: binomial tails are summed exactly with `math.comb`, normal
quantiles come from `statistics.NormalDist`.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from ..evals.metrics import mcnemar
from ..evals.metrics import wilson as _wilson

ALPHA = 0.05
POWER = 0.80
Z_ALPHA = NormalDist().inv_cdf(1 - ALPHA / 2)    # 1.959964
Z_POWER = NormalDist().inv_cdf(POWER)            # 0.841621

__all__ = ["mcnemar", "binomial_two_sided", "sign_test", "paired_bootstrap", "bootstrap_ci", "wilson", "holm",
           "mde_paired_proportions", "mde_paired_means", "percentile", "is_binary"]


def binomial_two_sided(k: int, n: int) -> float:
    """Two-sided exact binomial p-value of k successes in n trials at p = 1/2: 2 * P(X <= min(k, n - k)), at most 1.

    With p = 1/2 the distribution is symmetric, so doubling the smaller tail equals summing every outcome at most
    as likely as the one seen."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n)


def sign_test(wins_a: int, wins_b: int) -> dict:
    """Two-sided sign test of judge preferences, ties ignored: under the null each untied item is won by A or B
    with probability 1/2, so p = binomial_two_sided(wins_a, wins_a + wins_b)."""
    return {"a_wins": wins_a, "b_wins": wins_b, "p_value": binomial_two_sided(wins_a, wins_a + wins_b)}


def paired_bootstrap(a, b, iters: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of the mean difference d = mean(b - a) over items.

    Items are resampled with replacement (the same item for both candidates, which keeps the pairing); the 95%
    interval is the 2.5th and 97.5th percentile of the resampled means. The p-value tests mean difference 0 by
    shifting the resampled means to centre on 0: p = (1 + #{|d* - d| >= |d|}) / (iters + 1). Where every item has
    the same difference the resamples have no spread, and the p-value is the sign test's."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(d)
    if n == 0:
        return {"diff": float("nan"), "ci": [float("nan"), float("nan")], "p_value": 1.0}
    mean = float(d.mean())
    if n == 1 or np.all(d == d[0]):
        # every resample gives the same mean, so the bootstrap has no spread to test against; the sign test
        # (all n differences on one side) gives the exact p-value instead
        return {"diff": mean, "ci": [mean, mean], "p_value": 1.0 if mean == 0 else binomial_two_sided(0, n)}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(iters, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    extreme = int(np.sum(np.abs(means - mean) >= abs(mean) - 1e-12))
    return {"diff": mean, "ci": [float(lo), float(hi)], "p_value": min(1.0, (1 + extreme) / (iters + 1))}


def bootstrap_ci(values, iters: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean of `values`."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    if len(v) == 1 or np.all(v == v[0]):
        return [float(v[0]), float(v[0])]
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(iters, len(v)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def wilson(k: int, n: int, z: float = Z_ALPHA) -> list[float]:
    """The eval stage's Wilson score interval for k/n (95% by default), as a list."""
    return list(_wilson(k, n, z))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error over all the tests given): with the m p-values sorted
    ascending, the i-th (from 1) becomes max over j <= i of min(1, (m - j + 1) * p_(j)); returned in input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def mde_paired_proportions(n: int, discordant: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable difference in pass rate between two candidates on the same n items (McNemar).

    The normal approximation of McNemar's test (Connor 1987) detects a difference delta = p10 - p01 with the given
    power when sqrt(n) * delta = z_(1-alpha/2) * sqrt(psi) + z_power * sqrt(psi - delta^2), psi = p10 + p01 being
    the share of discordant items. psi is the observed share, but at least delta (a difference of delta needs
    that many discordant items), so identical candidates still get a finite figure rather than 0. Solved for delta
    by bisection; 1.0 when no delta up to 1 is detectable."""
    if n <= 0:
        return float("nan")
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)

    def detectable(delta: float) -> bool:
        psi = min(1.0, max(discordant, delta))
        return math.sqrt(n) * delta >= za * math.sqrt(psi) + zb * math.sqrt(max(0.0, psi - delta * delta))

    lo, hi = 0.0, 1.0
    if not detectable(hi):
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if detectable(mid) else (mid, hi)
    return hi


def mde_paired_means(n: int, sd_diff: float, sd_a: float = 0.0, sd_b: float = 0.0, alpha: float = ALPHA,
                     power: float = POWER) -> float:
    """Minimum detectable mean difference of a continuous score on n paired items: (z_(1-alpha/2) + z_power) *
    sd / sqrt(n), sd being the standard deviation of the per-item differences; where that is 0 (identical scores)
    the one for independent scores, sqrt(sd_a^2 + sd_b^2), so the figure stays a planning bound rather than 0.
    None when no score varies at all: then there is no spread to size a difference by."""
    if n <= 0:
        return None
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    sd = sd_diff if sd_diff > 0 else math.sqrt(sd_a ** 2 + sd_b ** 2)
    return (za + zb) * sd / math.sqrt(n) if sd > 0 else None


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    v = [x for x in values if x is not None]
    return float(np.percentile(v, q)) if v else float("nan")


def is_binary(values) -> bool:
    """Whether every score is 0 or 1 (a pass/fail metric, tested with McNemar rather than the bootstrap)."""
    return all(x in (0, 1, 0.0, 1.0, True, False) for x in values)
