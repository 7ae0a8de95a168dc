"""Overoptimization curves (Gao, Schulman & Hilton 2022): gold and proxy reward against d = sqrt(KL).

Shapes: ``P`` prompts, ``N`` samples per prompt (best-of-n), ``K`` values of k, ``C`` checkpoints, ``M`` points.

* **Best-of-k from n samples** (`best_of_k`, `best_of_k_weights`): the unbiased estimator of Nakano et al. 2021
  (WebGPT, appendix I). Draw a k-subset of the n samples without replacement and keep the one the proxy ranks
  highest; its expected gold (and proxy) is computed exactly, not by resampling. With distinct proxy values the
  sample of ascending rank i (1-based) is the best of a random k-subset with probability
  ``C(i-1, k-1) / C(n, k)``; a group of tied samples occupying ranks a..b wins with probability
  ``(C(b, k) - C(a-1, k)) / C(n, k)``, shared evenly among its members (the selection breaks ties at random).
* **Distance**: ``KL_bon(k) = log k - (k - 1) / k`` nats (`kl_bon`); for RL it is sampled (`rre_jax.sampled_kl`).
* **Fits** (`fit`): ``R_bon(d) = d (alpha - beta d)`` and ``R_RL(d) = d (alpha - beta log d)``, natural log,
  ``R(0) = 0`` (rewards re-centred so the initial policy scores 0). Both are linear in (alpha, beta) after
  dividing by d, so ``R/d = alpha - beta g(d)`` with ``g = d`` or ``log d`` is solved by ordinary least squares
  over the points with d > 0. Peaks: best-of-n ``d* = alpha / (2 beta)``, ``R* = alpha^2 / (4 beta)``; RL
  ``d* = exp(alpha / beta - 1)``, ``R* = beta d*`` (no peak, ``inf``, when beta <= 0). ``R^2`` is that of R.
* **Bootstrap** (`bootstrap_fit`): percentile intervals of alpha, beta, d*, R* over prompt resamples.
* **Overoptimization flag** (`overoptimized`): the measured points pass the fitted gold peak while the proxy
  still rises at the last point.
* **Length diagnostics** (`length_bucket_gains`, Singhal et al. 2023): gain within response-length buckets, so
  a reader sees how much of a proxy's gain is length alone.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from rre_jax.errors import UserError

FORMS = ("bon", "rl")


def kl_bon(k) -> np.ndarray:
    """``log k - (k - 1) / k`` nats: the KL from the base policy of the best-of-k policy (k >= 1)."""
    k = np.asarray(k, np.float64)
    if np.any(k < 1):
        raise UserError(f"best-of-k needs k >= 1, got {k[k < 1].tolist()}")
    return np.log(k) - (k - 1) / k


def check_ks(ks, n: int) -> list[int]:
    """``ks`` as sorted distinct ints, each in 1..n; a clear error otherwise."""
    if n < 1:
        raise UserError(f"--n {n}: best-of-n needs at least one sample per prompt (n >= 1)")
    ks = sorted({int(k) for k in ks})
    bad = [k for k in ks if not 1 <= k <= n]
    if not ks or bad:
        raise UserError(f"--k {bad or ks}: every k must be in 1..n={n} (the best of k is picked among the n samples)")
    return ks


def powers_of_two(n: int) -> list[int]:
    """``[1, 2, 4, ..., n]`` (n itself included when it is not a power of two)."""
    ks = [1 << i for i in range(max(n, 1).bit_length()) if 1 << i <= n]
    return ks + ([n] if ks[-1] != n else [])


def best_of_k_weights(proxy_PxN, k: int) -> np.ndarray:
    """``f64[P, N]``: the probability that each sample is the proxy-best of a random k-subset of its row."""
    proxy_PxN = np.atleast_2d(np.asarray(proxy_PxN, np.float64))
    P, N = proxy_PxN.shape
    if not 1 <= k <= N:
        raise UserError(f"best-of-k: k={k} must be in 1..n={N}")
    if not np.all(np.isfinite(proxy_PxN)):
        raise UserError("best-of-k: proxy scores must be finite (a NaN proxy cannot be ranked)")
    # cdf_i = C(i, k) / C(n, k): probability that the best of the subset has rank <= i; built downwards from 1.
    cdf = np.zeros(N + 1)
    cdf[N] = 1.0
    for i in range(N, k, -1):
        cdf[i - 1] = cdf[i] * (i - k) / i
    order_PxN = np.argsort(proxy_PxN, axis=1, kind="stable")
    sorted_PxN = np.take_along_axis(proxy_PxN, order_PxN, axis=1)
    pos = np.arange(N)
    new_group = np.concatenate([np.ones((P, 1), bool), sorted_PxN[:, 1:] != sorted_PxN[:, :-1]], axis=1)
    start_PxN = np.maximum.accumulate(np.where(new_group, pos, 0), axis=1)  # samples ranked below the group
    end_group = np.concatenate([new_group[:, 1:], np.ones((P, 1), bool)], axis=1)
    end_PxN = np.minimum.accumulate(np.where(end_group, pos + 1, N)[:, ::-1], axis=1)[:, ::-1]
    w_sorted = (cdf[end_PxN] - cdf[start_PxN]) / (end_PxN - start_PxN)
    w_PxN = np.empty_like(w_sorted)
    np.put_along_axis(w_PxN, order_PxN, w_sorted, axis=1)
    return w_PxN


def best_of_k(proxy_N, gold_N, k: int) -> float:
    """Expected gold of the proxy-selected best of a random k-subset of one prompt's n samples (exact)."""
    return float(best_of_k_many(np.asarray(proxy_N)[None], np.asarray(gold_N)[None], k)[0])


def best_of_k_many(proxy_PxN, score_PxN, k: int) -> np.ndarray:
    """``f64[P]``: `best_of_k` for every prompt (``score`` is gold, or the proxy itself, or any other score)."""
    score_PxN = np.asarray(score_PxN, np.float64)
    return np.sum(best_of_k_weights(proxy_PxN, k) * score_PxN, axis=1)


def best_of_k_curve(proxy_PxN, score_PxN, ks) -> np.ndarray:
    """``f64[P, K]``: best-of-k expectation of ``score`` for each prompt and each k in ``ks``."""
    return np.stack([best_of_k_many(proxy_PxN, score_PxN, k) for k in ks], axis=1)


# ======================================================================================= fits

@dataclasses.dataclass(frozen=True)
class Fit:
    """One fitted curve: ``form`` in FORMS, coefficients, peak, R^2 and (after `bootstrap_fit`) intervals."""

    form: str
    alpha: float
    beta: float
    d_star: float
    r_star: float
    r2: float
    ci: dict = dataclasses.field(default_factory=dict)  # name -> (lo, hi)

    def predict(self, d) -> np.ndarray:
        return predict(self.form, self.alpha, self.beta, d)


def _g(form: str, d):
    if form not in FORMS:
        raise ValueError(f"fit form {form!r}; choose one of {FORMS}")
    return d if form == "bon" else np.log(d)


def predict(form: str, alpha: float, beta: float, d) -> np.ndarray:
    """``R(d)`` of the fitted form (``R(0) = 0``)."""
    d = np.asarray(d, np.float64)
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, safe * (alpha - beta * _g(form, safe)), 0.0)


def peak(form: str, alpha: float, beta: float) -> tuple[float, float]:
    """``(d*, R*)``: where the fitted curve peaks (``(inf, inf)`` when beta <= 0: it never turns down)."""
    if not beta > 0:
        return math.inf, math.inf
    if form == "bon":
        return alpha / (2 * beta), alpha ** 2 / (4 * beta)
    d_star = math.exp(min(alpha / beta - 1, 700.0))
    return d_star, beta * d_star


def fit(form: str, d_M, r_M) -> Fit:
    """Least squares of ``R/d = alpha - beta g(d)`` over the points with d > 0 (NaNs when fewer than two)."""
    d_M, r_M = np.asarray(d_M, np.float64), np.asarray(r_M, np.float64)
    keep = (d_M > 0) & np.isfinite(r_M) & np.isfinite(d_M)
    d, r = d_M[keep], r_M[keep]
    g = _g(form, d) if keep.any() else d
    if len(d) < 2 or np.ptp(g) == 0:
        return Fit(form, math.nan, math.nan, math.nan, math.nan, math.nan)
    A = np.stack([np.ones_like(d), -g], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(A, r / d, rcond=None)
    resid = r - predict(form, alpha, beta, d)
    total = np.sum((r - r.mean()) ** 2)
    r2 = 1.0 - np.sum(resid ** 2) / total if total > 0 else math.nan
    return Fit(form, float(alpha), float(beta), *peak(form, float(alpha), float(beta)), float(r2))


def bootstrap_fit(form: str, points: Callable[[np.ndarray], tuple], n_prompts: int, *, n_boot: int = 1000,
                  seed: int = 0, level: float = 0.95) -> Fit:
    """`fit` of ``points(all prompts)`` with percentile intervals over ``n_boot`` prompt resamples.

    ``points(idx_P)`` returns ``(d_M, r_M)`` computed from the prompts ``idx_P`` (with repeats).
    """
    base = fit(form, *points(np.arange(n_prompts)))
    rng = np.random.default_rng(seed)
    draws = np.array([dataclasses.astuple(fit(form, *points(rng.integers(0, n_prompts, n_prompts))))[1:5]
                      for _ in range(n_boot)], dtype=np.float64).reshape(n_boot, 4)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = {}
    for j, name in enumerate(("alpha", "beta", "d_star", "r_star")):
        col = draws[:, j][~np.isnan(draws[:, j])]
        method = "linear" if np.all(np.isfinite(col)) else "nearest"  # no peak (inf) in some resamples
        ci[name] = tuple(float(x) for x in np.percentile(col, q, method=method)) if len(col) else (math.nan,) * 2
    return dataclasses.replace(base, ci=ci)


def overoptimized(gold_fit: Fit, d_M, proxy_M) -> bool:
    """True when the measured d passes the fitted gold peak while the proxy still rises at the last point."""
    d_M, proxy_M = np.asarray(d_M, np.float64), np.asarray(proxy_M, np.float64)
    if len(d_M) < 2 or not math.isfinite(gold_fit.d_star):
        return False
    order = np.argsort(d_M, kind="stable")
    return bool(d_M[order[-1]] > gold_fit.d_star and proxy_M[order[-1]] > proxy_M[order[-2]])


# ======================================================================================= length diagnostics

def length_bucket_gains(len_base, score_base, len_new, score_new, w_new=None, n_buckets: int = 4) -> dict:
    """Gain of ``score`` from the base responses to the new ones, overall and within length buckets.

    Buckets are quantiles of the base lengths (``n_buckets``). ``w_new`` weights the new responses (best-of-k:
    each sample's probability of being selected; default 1 each). ``within`` is the bucket gains averaged with
    the new responses' weight in each bucket (buckets the new responses never reach count 0): the gain that
    length alone does not explain; ``length_share = 1 - within / overall``.
    """
    len_base, score_base = np.asarray(len_base, np.float64), np.asarray(score_base, np.float64)
    len_new, score_new = np.asarray(len_new, np.float64), np.asarray(score_new, np.float64)
    w_new = np.ones_like(score_new) if w_new is None else np.asarray(w_new, np.float64)
    inner = np.unique(np.quantile(len_base, np.linspace(0, 1, n_buckets + 1))[1:-1])
    edges = np.concatenate([[-np.inf], inner, [np.inf]])  # bucket b holds lengths in [edges[b], edges[b+1])
    b_base = np.clip(np.searchsorted(edges, len_base, side="right") - 1, 0, len(edges) - 2)
    b_new = np.clip(np.searchsorted(edges, len_new, side="right") - 1, 0, len(edges) - 2)
    buckets, within, mass = [], 0.0, 0.0
    for b in range(len(edges) - 1):
        in_base, in_new = b_base == b, b_new == b
        m = float(w_new[in_new].sum())
        base = float(score_base[in_base].mean()) if in_base.any() else math.nan
        new = float(np.sum(w_new[in_new] * score_new[in_new]) / m) if m > 0 else math.nan
        buckets.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n_base": int(in_base.sum()),
                        "weight_new": m / float(w_new.sum()), "base": base, "new": new, "gain": new - base})
        if m > 0 and in_base.any():
            within, mass = within + m * (new - base), mass + m
    overall = float(np.sum(w_new * score_new) / w_new.sum() - score_base.mean())
    within = within / mass if mass > 0 else math.nan
    share = 1.0 - within / overall if overall != 0 and math.isfinite(within) else math.nan
    return {"overall": overall, "within": within, "length_share": share, "buckets": buckets}
