"""Composition of features into the proxy: every switch combination against the reference's loop."""
import itertools

import jax
import numpy as np
import pytest

from rre_jax import reward


def _reference_combine(li, rp, qr, ar, qtypes, length, repetition, relevance, branching, max_len=512):
    """The reference's ReversedEngineeredRewardForInference._combine_scores, per item, in plain Python."""
    out = []
    for i, qtype in enumerate(qtypes):
        ls = li[i] if length else 1.0
        branch = relevance and branching and qtype == "CONSTRAINED"
        rs = (ar[i] if branch else qr[i]) if relevance else 1.0
        score = (0.0 + (rs - 0.0) / 3.5 * (max_len / 100 - 0.0)) if branch else ls * rs
        out.append(score * rp[i] if repetition else score)
    return np.array(out, np.float64)


@pytest.mark.parametrize("switches", list(itertools.product([False, True], repeat=4)))
def test_compose_matches_reference_for_every_switch(switches):
    length, repetition, relevance, branching = switches
    rng = np.random.default_rng(0)
    n = 64
    li, rp = rng.uniform(0, 5, n).astype(np.float32), rng.uniform(0, 1, n).astype(np.float32)
    qr, ar = rng.uniform(-1, 3.5, n).astype(np.float32), rng.uniform(-1, 3.5, n).astype(np.float32)
    qtypes = rng.choice(["OPENENDED", "CONSTRAINED"], n)
    spec = reward.RewardSpec(length=length, repetition=repetition, relevance=relevance, branching=branching)
    got = jax.jit(lambda *a: reward.compose(spec, *a))(li, rp, qr, ar, qtypes == "CONSTRAINED")
    want = _reference_combine(li.astype(np.float64), rp, qr, ar, qtypes, *switches)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_presets_and_counterfactual_scoring():
    li = np.array([1.0, 2.0], np.float32)
    rp = np.array([0.5, 1.0], np.float32)
    qr = np.array([2.0, 1.0], np.float32)
    ar = np.array([3.5, 1.75], np.float32)
    constrained = np.array([False, True])
    specs = {k: reward.preset(k) for k in ("li", "li_rp", "qr_li_rp", "rer")}
    got = {k: np.asarray(reward.compose(s, li, rp, qr, ar, constrained)) for k, s in specs.items()}
    np.testing.assert_allclose(got["li"], [1.0, 2.0])
    np.testing.assert_allclose(got["li_rp"], [0.5, 2.0])
    np.testing.assert_allclose(got["qr_li_rp"], [1.0, 2.0])
    np.testing.assert_allclose(got["rer"], [1.0, 1.75 / 3.5 * 5.12 * 1.0], rtol=1e-6)
    with pytest.raises(KeyError, match="unknown reward preset 'rr'"):
        reward.preset("rr")
    with pytest.raises(ValueError, match="needs|required|relevance"):
        reward.compose(specs["rer"], li, rp, qr, None, constrained)
    with pytest.raises(ValueError, match="qtype_source"):
        reward.RewardSpec(qtype_source="guess")
