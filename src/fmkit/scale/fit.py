"""Scaling-law fits: L(N, D) = E + A/N^alpha + B/D^beta by Chinchilla's approach 3, approach-1 envelopes, and
the compute-optimal N and D for a budget, each with bootstrap intervals from resampling runs.

Approach 3 follows Hoffmann et al. (2022), appendix D.2: the law is fitted in log space through a log-sum-exp
(log L = LSE(a - alpha log N, b - beta log D, e) with A = exp a, B = exp b, E = exp e), the objective is the Huber
loss (delta = 1e-3) of the log-loss residuals, and L-BFGS starts from the best points of a grid. scipy is not a
dependency, so L-BFGS is the small numpy implementation below (analytic gradient, backtracking line search).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

PARAMS = ("e", "a", "b", "alpha", "beta")
# Chinchilla's initialisation grid, with e reaching up to 2 (E = 7.4 nats): small vocabularies and tiny models
# sit far above the large-model E of ~1.7
GRID = {"e": np.arange(-1.0, 2.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0),
        "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5)}
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}        # Hoffmann et al., eq. 10
# Muennighoff et al. (2023), "Scaling Data-Constrained Language Models", eq. 5: a token seen for the R-th time is
# worth less, decaying with R* = 15.4 repetitions' worth of data
R_STAR = 15.39
# Besiroglu et al. (2024), "Chinchilla Scaling: A replication attempt": approach 3 refitted on the paper's data
EPOCH_REFIT = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        """Predicted loss for N parameters trained on D tokens."""
        with np.errstate(all="ignore"):   # a degenerate bootstrap law may overflow: NaN, left out of intervals
            return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimum(self, compute: float) -> dict:
        """The N and D that minimise the loss at C = 6ND (Hoffmann et al., eq. 4), and that loss; NaN where the
        law has no interior optimum (a term that does not fall with its variable)."""
        if min(self.A, self.B, self.alpha, self.beta) <= 0:
            nan = float("nan")
            return {"compute": compute, "N": nan, "D": nan, "tokens_per_param": nan, "loss": nan}
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (compute / 6) ** (self.beta / (self.alpha + self.beta))
        d = compute / 6 / n
        return {"compute": compute, "N": float(n), "D": float(d), "tokens_per_param": float(d / n),
                "loss": float(self.loss(n, d))}


def effective_tokens(d: float, unique: float | None) -> float:
    """The fresh tokens that D tokens seen are worth when the data holds `unique` tokens: D itself up to one pass,
    then D' = U + U R* (1 - exp(-R / R*)) with R = D/U - 1 repetitions (Muennighoff et al. 2023)."""
    if not unique or d <= unique:
        return d
    return unique + unique * R_STAR * (1 - math.exp(-(d / unique - 1) / R_STAR))


def _tokens(p: dict, repeats: bool) -> float:
    """A point's D for the law: the effective tokens where its data's unique tokens are known and `repeats`."""
    return effective_tokens(p["D"], p.get("unique")) if repeats else p["D"]


def _objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, logl: np.ndarray, delta: float):
    """Summed Huber loss of LSE(a - alpha x, b - beta y, e) - log L, and its gradient."""
    e, a, b, alpha, beta = theta
    t = np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)])
    top = t.max(axis=0)
    w = np.exp(t - top)
    lse = top + np.log(w.sum(axis=0))
    w /= w.sum(axis=0)
    r = lse - logl
    small = np.abs(r) <= delta
    f = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    h = np.where(small, r, delta * np.sign(r))
    grad = np.array([(h * w[2]).sum(), (h * w[0]).sum(), (h * w[1]).sum(), -(h * w[0] * x).sum(),
                     -(h * w[1] * y).sum()])
    return f, grad


def lbfgs(fun, x0: np.ndarray, iters: int = 400, memory: int = 10, tol: float = 1e-13) -> tuple[np.ndarray, float]:
    """Minimise `fun(x) -> (f, grad)` by L-BFGS (two-loop recursion, Armijo backtracking); returns (x, f)."""
    x = np.asarray(x0, float)
    f, g = fun(x)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(iters):
        q, coeffs = g.copy(), []
        for s, y in reversed(pairs):
            rho = 1.0 / (y @ s)
            c = rho * (s @ q)
            q -= c * y
            coeffs.append((rho, c, s, y))
        q *= (pairs[-1][0] @ pairs[-1][1]) / (pairs[-1][1] @ pairs[-1][1]) if pairs else 1.0 / max(
            np.abs(g).max(), 1e-12)
        for rho, c, s, y in reversed(coeffs):
            q += s * (c - rho * (y @ q))
        step = -q
        if g @ step >= 0:   # not a descent direction: forget the curvature pairs and follow the gradient
            pairs, step = [], -g / max(np.abs(g).max(), 1e-12)
        t, slope = 1.0, g @ step
        while True:
            x_new = x + t * step
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        if f_new > f:
            break
        s, y = x_new - x, g_new - g
        if s @ y > 1e-16:
            pairs = (pairs + [(s, y)])[-memory:]
        done = f - f_new <= tol * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if done and np.abs(g).max() < 1e-9 or not np.any(s):
            break
    return x, f


def _on_edge(theta: np.ndarray) -> list[str]:
    """Parameters that ended at or past the grid's range: the grid did not bracket the optimum there."""
    return [name for name, v in zip(PARAMS, theta)
            if v <= GRID[name][0] + 1e-6 or v >= GRID[name][-1] - 1e-6]


def fit_law(n, d, loss, delta: float = 1e-3, starts: int = 8) -> dict:
    """Approach 3 on (N, D, loss) points: L-BFGS from the `starts` best grid points, the lowest objective wins."""
    x, y, logl = np.log(np.asarray(n, float)), np.log(np.asarray(d, float)), np.log(np.asarray(loss, float))
    grid = np.array(list(itertools.product(*GRID.values())))
    e, a, b, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    t = np.stack(np.broadcast_arrays(a - alpha * x, b - beta * y, e))
    r = np.logaddexp.reduce(t, axis=0) - logl
    f = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1)
    best = None
    for i in np.argsort(f)[:starts]:
        theta, value = lbfgs(lambda th: _objective(th, x, y, logl, delta), grid[i])
        if best is None or value < best[1]:
            best = (theta, value, grid[i])
    theta, value, start = best
    law = Law(math.exp(theta[0]), math.exp(theta[1]), math.exp(theta[2]), float(theta[3]), float(theta[4]))
    return {"law": law, "objective": float(value), "start": dict(zip(PARAMS, map(float, start))),
            "edge": _on_edge(theta)}


def envelope(points: list[dict], bins: int = 12) -> list[dict]:
    """Approach 1: at each of `bins` log-spaced compute values, the run with the lowest loss there.

    Each run's losses (intermediate and final) are interpolated in log compute; a compute value counts only for
    runs whose curve spans it. Intermediate points of a cosine schedule sit above what a run of that length would
    reach, as Hoffmann et al. note, so plans give each size several lengths and the final points dominate."""
    runs: dict[str, list[dict]] = {}
    for p in points:
        runs.setdefault(p["run"], []).append(p)
    curves = []
    for rows in runs.values():
        rows = sorted(rows, key=lambda p: p["D"])
        c = np.log([6 * p["N"] * p["D"] for p in rows])
        curves.append((rows[0]["N"], c, np.array([p["loss"] for p in rows])))
    lo = min(c[0] for _, c, _ in curves)
    hi = max(c[-1] for _, c, _ in curves)
    out = []
    for logc in np.linspace(lo, hi, bins):
        here = [(float(np.interp(logc, c, ls)), n) for n, c, ls in curves if c[0] <= logc <= c[-1]]
        if here:
            loss, n = min(here)
            out.append({"compute": float(math.exp(logc)), "N": float(n), "D": float(math.exp(logc) / 6 / n),
                        "loss": loss})
    return out


def power_fit(xs, ys) -> dict | None:
    """y = k x^p by least squares in log-log space; None with fewer than two distinct x."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    if len(set(np.round(lx, 9))) < 2 or len(set(np.round(ly, 9))) < 2:
        return None
    p, logk = np.polyfit(lx, ly, 1)
    return {"exponent": float(p), "coefficient": float(math.exp(logk))}


def _approach1(points: list[dict]) -> dict:
    env = envelope(points)
    return {"envelope": env, "N_opt": power_fit([r["compute"] for r in env], [r["N"] for r in env]),
            "D_opt": power_fit([r["compute"] for r in env], [r["D"] for r in env])}


def _interval(values, level: float) -> list[float]:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if not len(values):
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def fit(points: list[dict], budgets: list[float] = (), bootstrap: int = 200, level: float = 0.95,
        delta: float = 1e-3, seed: int = 0, repeats: bool = True) -> dict:
    """Approach 3 on each run's final loss and approach 1 on all losses, with bootstrap intervals over runs.

    `points` are dicts with run (an id), N, D, loss, final (the run's last point) and optionally unique (the
    unique tokens of the run's data). With `repeats`, approach 3 fits each run's effective tokens
    (`effective_tokens`): runs that pass over their data more than once saw less than D fresh tokens' worth, and
    a law fitted on raw D over-predicts what more passes give. Budgets' optima assume fresh data. Each bootstrap
    replicate draws runs with replacement, refits both, and the intervals are the replicates' central `level`
    range."""
    final = [p for p in points if p.get("final", True)]
    if len({(p["N"], p["D"]) for p in final}) < 5:
        raise ValueError(f"a fit of five parameters needs at least 5 distinct (N, D) runs, got {len(final)}")
    main = fit_law([p["N"] for p in final], [_tokens(p, repeats) for p in final], [p["loss"] for p in final], delta)
    law = main["law"]
    budgets = list(budgets) or [6 * max(p["N"] * p["D"] for p in final) * 4]
    rng = np.random.default_rng(seed)
    ids = sorted({p["run"] for p in points})
    by_run = {i: [p for p in points if p["run"] == i] for i in ids}
    reps, edges = [], 0
    for _ in range(bootstrap):
        drawn = rng.choice(len(ids), len(ids))
        sample = [dict(p, run=f"{k}:{p['run']}") for k, j in enumerate(drawn) for p in by_run[ids[j]]]
        fin = [p for p in sample if p.get("final", True)]
        if len({(p["N"], p["D"]) for p in fin}) < 5:
            continue
        rep = fit_law([p["N"] for p in fin], [_tokens(p, repeats) for p in fin], [p["loss"] for p in fin], delta,
                      starts=3)
        edges += bool(rep["edge"])
        reps.append((rep["law"], _approach1(sample)))
    laws = [r[0] for r in reps]
    intervals = {k: _interval([getattr(lw, k) for lw in laws], level) for k in asdict(law)}
    optima = []
    for c in budgets:
        best = law.optimum(c)
        rep = [lw.optimum(c) for lw in laws]
        optima.append({**best, **{f"{k}_interval": _interval([r[k] for r in rep], level)
                                  for k in ("N", "D", "tokens_per_param", "loss")}})
    a1 = _approach1(points)
    for key in ("N_opt", "D_opt"):
        if a1[key]:
            a1[key]["exponent_interval"] = _interval([r[1][key]["exponent"] if r[1][key] else None for r in reps],
                                                     level)
    return {"law": asdict(law), "intervals": intervals, "level": level, "objective": main["objective"],
            "start": main["start"], "edge": main["edge"], "bootstrap": len(reps), "bootstrap_on_edge": edges,
            "exponents": {"a": law.beta / (law.alpha + law.beta), "b": law.alpha / (law.alpha + law.beta)},
            "optimum": optima, "approach1": a1, "runs": len(ids), "points": len(final),
            "repeats": repeats and any(p.get("unique") and p["D"] > p["unique"] for p in final),
            "replicates": [asdict(lw) for lw in laws]}
