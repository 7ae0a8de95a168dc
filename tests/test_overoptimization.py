"""Overoptimization maths: the best-of-k estimator against brute-force enumeration of k-subsets, KL_bon, the two
fitted forms and their bootstrap intervals, the overoptimization flag and the length-bucket diagnostics."""
import itertools
import math

import numpy as np
import pytest

from rre_jax.errors import UserError
from rre_jax.evaluate import overoptimization as oo


def brute_force(proxy, gold, k):
    """Mean over every k-subset of the gold of its proxy-best member; ties split evenly among the tied best."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(proxy)), k))
    for s in subsets:
        top = max(proxy[i] for i in s)
        best = [i for i in s if proxy[i] == top]
        total += sum(gold[i] for i in best) / len(best)
    return total / len(subsets)


def test_best_of_k_equals_enumeration_with_ties():
    rng = np.random.default_rng(0)
    cases = 0
    for n in range(1, 11):
        for trial in range(6):
            # small integer proxies force ties (several per row), continuous gold
            proxy = rng.integers(0, max(2, n // 2 + trial % 3), n).astype(float)
            gold = rng.normal(size=n)
            for k in range(1, n + 1):
                want = brute_force(proxy, gold, k)
                # 1e-12: weights are products of <= 10 ratios and sums of <= 10 terms of O(1): ~1e-15 round-off
                assert abs(oo.best_of_k(proxy, gold, k) - want) < 1e-12, (n, k, proxy)
                cases += 1
    assert cases == 6 * sum(range(1, 11))


def test_best_of_k_special_cases():
    rng = np.random.default_rng(1)
    proxy, gold = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    # k = 1: the mean of the samples; k = n: the gold of the proxy argmax
    np.testing.assert_allclose(oo.best_of_k_many(proxy, gold, 1), gold.mean(1), rtol=0, atol=1e-14)
    np.testing.assert_allclose(oo.best_of_k_many(proxy, gold, 8), gold[np.arange(5), proxy.argmax(1)], atol=1e-14)
    w = oo.best_of_k_weights(proxy, 3)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-14)
    # rank i of n (1-based, ascending) wins with C(i-1, k-1) / C(n, k)
    ranks = proxy[0].argsort().argsort() + 1
    np.testing.assert_allclose(w[0], [math.comb(int(i) - 1, 2) / math.comb(8, 3) for i in ranks], atol=1e-15)
    curve = oo.best_of_k_curve(proxy, proxy, [1, 2, 4, 8])
    assert np.all(np.diff(curve, axis=1) > 0)  # the proxy of the proxy-best rises with k


def test_kl_bon():
    assert oo.kl_bon(1) == 0.0
    np.testing.assert_allclose(oo.kl_bon([2, 4, 1000]), [math.log(2) - 0.5, math.log(4) - 0.75,
                                                          math.log(1000) - 0.999], rtol=1e-15)
    assert 5.9 < float(oo.kl_bon(1000)) < 6.0  # "n = 1000 gives about 6 nats"
    # KL_bon(n) is the exact KL of the best-of-n policy of a continuous score: check on a 1000-point uniform grid
    n, m = 4, 1000
    p_best = (np.arange(1, m + 1) / m) ** n - (np.arange(m) / m) ** n  # best of n draws from m equal atoms
    exact = float(np.sum(p_best * np.log(p_best * m)))
    assert abs(exact - float(oo.kl_bon(n))) < 5e-3  # the discrete grid converges at O(log m / m)
    with pytest.raises(UserError, match="k >= 1"):
        oo.kl_bon(0)


def test_check_ks_errors():
    assert oo.check_ks([8, 1, 2, 2], 8) == [1, 2, 8]
    assert oo.powers_of_two(16) == [1, 2, 4, 8, 16] and oo.powers_of_two(12) == [1, 2, 4, 8, 12]
    with pytest.raises(UserError, match="n >= 1"):
        oo.check_ks([1], 0)
    with pytest.raises(UserError, match=r"\[32\].*1..n=16"):
        oo.check_ks([1, 32], 16)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.3, 0.4), ("rl", 0.8, 0.35)])
def test_fit_recovers_noise_free_coefficients(form, alpha, beta):
    d = np.sqrt(oo.kl_bon(np.array([1, 2, 4, 8, 16, 32, 64, 128]))) if form == "bon" else np.linspace(0, 6, 9)
    r = oo.predict(form, alpha, beta, d)
    f = oo.fit(form, d, r)
    # exact up to the least-squares solve's round-off (condition number < 1e3 here)
    assert abs(f.alpha - alpha) < 1e-12 and abs(f.beta - beta) < 1e-12 and f.r2 > 1 - 1e-12
    if form == "bon":
        assert math.isclose(f.d_star, alpha / (2 * beta)) and math.isclose(f.r_star, alpha ** 2 / (4 * beta))
    else:
        assert math.isclose(f.d_star, math.exp(alpha / beta - 1)) and math.isclose(f.r_star, beta * f.d_star)
    assert math.isclose(float(f.predict(f.d_star)), f.r_star, rel_tol=1e-12)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.0, 0.3), ("rl", 0.6, 0.3)])
def test_fit_noisy_points_inside_bootstrap_interval(form, alpha, beta):
    """Per-prompt points = true curve + prompt noise; the true alpha, beta lie inside the 95% prompt-bootstrap CI."""
    rng = np.random.default_rng(3)
    d = np.sqrt(oo.kl_bon(np.array([2, 4, 8, 16, 32, 64]))) if form == "bon" else np.linspace(0.3, 5, 8)
    P = 200
    r_PxM = oo.predict(form, alpha, beta, d)[None] + rng.normal(scale=0.5, size=(P, len(d)))
    f = oo.bootstrap_fit(form, lambda idx: (d, r_PxM[idx].mean(0)), P, n_boot=400, seed=0)
    for name, true in (("alpha", alpha), ("beta", beta)):
        lo, hi = f.ci[name]
        assert lo < true < hi, (name, lo, true, hi)
        assert hi - lo < 0.5  # the interval is informative, not vacuous
    assert lo < hi


def test_overoptimization_flag():
    d = np.sqrt(oo.kl_bon(np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])))
    gold = oo.predict("bon", 1.0, 0.6, d)  # peaks at d* = 0.83, inside the measured range
    proxy = 1.5 * d
    g = oo.fit("bon", d, gold)
    assert oo.overoptimized(g, d, proxy)
    assert not oo.overoptimized(g, d, np.r_[proxy[:-1], proxy[-2] - 0.1])  # the proxy stopped rising
    assert not oo.overoptimized(oo.fit("bon", d, oo.predict("bon", 1.0, 0.05, d)), d, proxy)  # peak beyond


def test_length_bucket_gains():
    rng = np.random.default_rng(4)
    len_base = rng.integers(1, 100, 4000)
    score_base = len_base / 10 + rng.normal(size=4000)
    # length-only gain: the new responses are longer, same score law -> within-bucket gain ~ 0, share ~ 1
    len_new = rng.integers(50, 100, 4000)
    out = oo.length_bucket_gains(len_base, score_base, len_new, len_new / 10 + rng.normal(size=4000), n_buckets=8)
    assert out["overall"] > 2 and abs(out["within"]) < 0.35 and out["length_share"] > 0.85
    # same lengths, +1 everywhere: all of the gain is within buckets
    out = oo.length_bucket_gains(len_base, score_base, len_base, score_base + 1.0)
    assert math.isclose(out["overall"], 1.0) and math.isclose(out["within"], 1.0) and abs(out["length_share"]) < 1e-12
    assert len(out["buckets"]) == 4 and math.isclose(sum(b["weight_new"] for b in out["buckets"]), 1.0)
