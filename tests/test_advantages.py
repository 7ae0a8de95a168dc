"""rre_jax.advantages against the NumPy port of trl 0.7.4 (tests/trl_reference.py), fp32, at 1e-5."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trl_reference as ref
from rre_jax import advantages as adv

TOL = dict(rtol=1e-5, atol=1e-5)


def _mask(rng, B, T, left_pad=True):
    """Response masks of varied lengths, some with a left offset (like trl's query positions)."""
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        start = int(rng.integers(0, T // 3)) if left_pad else 0
        length = int(rng.integers(2, T - start + 1))
        mask[b, start:start + length] = 1.0
    return mask


def test_masked_statistics_match_trl():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (6, 17)).astype(np.float32)
    m = _mask(rng, 6, 17)
    np.testing.assert_allclose(adv.masked_mean(jnp.asarray(x), jnp.asarray(m)), ref.masked_mean(x, m), **TOL)
    np.testing.assert_allclose(adv.masked_mean(jnp.asarray(x), jnp.asarray(m), axis=1),
                               ref.masked_mean(x, m, axis=1), **TOL)
    np.testing.assert_allclose(adv.masked_var(jnp.asarray(x), jnp.asarray(m)), ref.masked_var(x, m), **TOL)
    np.testing.assert_allclose(adv.masked_var(jnp.asarray(x), jnp.asarray(m), unbiased=False),
                               ref.masked_var(x, m, unbiased=False), **TOL)
    for shift in (True, False):
        got = adv.masked_whiten(jnp.asarray(x), jnp.asarray(m), shift_mean=shift)
        np.testing.assert_allclose(got, ref.masked_whiten(x, m, shift_mean=shift), **TOL)
    # Bessel's correction is what makes the whitened masked entries have unit sample variance.
    w = np.asarray(adv.masked_whiten(jnp.asarray(x), jnp.asarray(m)))[m > 0]
    assert abs(w.mean()) < 1e-5 and abs(w.var(ddof=1) - 1) < 1e-4


def test_score_moments_over_several_updates_match_trl():
    rng = np.random.default_rng(1)
    running, moments = ref.RunningMoments(), adv.init_moments()
    update = jax.jit(adv.update_moments)
    for i, n in enumerate((16, 16, 7, 32, 3)):
        scores = rng.normal(3.0 * i - 2.0, 1.0 + i, n).astype(np.float32)
        ref_mean, ref_std = running.update(scores)
        moments, mean_b, std_b = update(moments, jnp.asarray(scores))
        np.testing.assert_allclose(mean_b, ref_mean, **TOL)
        np.testing.assert_allclose(std_b, ref_std, **TOL)
        for name in ("mean", "var", "std", "count"):
            np.testing.assert_allclose(getattr(moments, name), getattr(running, name), **TOL, err_msg=name)
    assert float(moments.count) == pytest.approx(16 + 16 + 7 + 32 + 3)


@pytest.mark.parametrize("scaling,norm,clip", [(True, True, 10.0), (True, True, 0.5), (True, False, None),
                                               (False, False, 1.0), (False, False, None)])
def test_score_scaling_and_clipping_match_trl_step(scaling, norm, clip):
    rng = np.random.default_rng(2)
    running, moments = ref.RunningMoments(), adv.init_moments()
    fn = jax.jit(adv.scale_scores, static_argnames=("scaling", "norm", "clip"))
    for i in range(3):
        scores = rng.normal(5.0, 2.0 + i, 16).astype(np.float32)
        want = ref.scale_scores(running, scores, scaling, norm, clip)
        moments, got = fn(moments, jnp.asarray(scores), scaling=scaling, norm=norm, clip=clip)
        np.testing.assert_allclose(got, want, **TOL)
    if clip is not None:
        assert np.abs(np.asarray(got)).max() <= clip
    if not scaling:
        assert float(moments.count) == pytest.approx(1e-24)  # untouched


@pytest.mark.parametrize("mode", ["kl", "abs", "mse", "full"])
def test_shaped_rewards_match_trl_compute_rewards(mode):
    rng = np.random.default_rng(3)
    B, T, V = 5, 11, 7
    mask = _mask(rng, B, T)
    mask[0, -1] = 1.0  # one row ending on the last position
    if mode == "full":
        logits, ref_logits = rng.normal(size=(2, B, T, V)).astype(np.float32)
        logp = np.asarray(jax.nn.log_softmax(logits)); ref_logp = np.asarray(jax.nn.log_softmax(ref_logits))
    else:
        logp, ref_logp = (-rng.gamma(2.0, 1.0, (2, B, T))).astype(np.float32)
    score = rng.normal(0, 3, B).astype(np.float32)
    want_r, want_ns = ref.compute_rewards(score, logp, ref_logp, mask, 0.3, mode)
    got_r, got_ns = jax.jit(adv.shaped_rewards, static_argnames="kl_mode")(
        jnp.asarray(logp), jnp.asarray(ref_logp), jnp.asarray(score), jnp.asarray(mask), 0.3, kl_mode=mode)
    np.testing.assert_allclose(got_r, want_r, **TOL)
    np.testing.assert_allclose(got_ns, want_ns, **TOL)
    # The score lands exactly on the last counted token of each row.
    last = [np.nonzero(mask[b])[0][-1] for b in range(B)]
    np.testing.assert_allclose(np.asarray(got_r - got_ns)[np.arange(B), last], score, **TOL)


def test_empty_mask_row_gets_no_score():
    mask = jnp.asarray([[0, 1, 1, 0], [0, 0, 0, 0]], jnp.float32)
    r, ns = adv.shaped_rewards(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.asarray([2.0, 5.0]), mask, 0.1)
    np.testing.assert_array_equal(np.asarray(r - ns), [[0, 0, 2, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("gamma,lam,whiten_rewards", [(1.0, 0.95, False), (0.9, 0.8, False), (1.0, 1.0, True)])
def test_gae_and_whitened_advantages_match_trl(gamma, lam, whiten_rewards):
    rng = np.random.default_rng(4)
    B, T = 6, 33
    mask = _mask(rng, B, T)
    values = rng.normal(size=(B, T)).astype(np.float32)
    rewards = (rng.normal(size=(B, T)) * 0.1).astype(np.float32)
    want_v, want_a, want_r = ref.compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards)
    got_v, got_a, got_r = jax.jit(adv.compute_advantages, static_argnums=(3, 4, 5))(
        jnp.asarray(values), jnp.asarray(rewards), jnp.asarray(mask), gamma, lam, whiten_rewards)
    np.testing.assert_allclose(got_v, want_v, **TOL)
    np.testing.assert_allclose(got_a, want_a, **TOL)
    np.testing.assert_allclose(got_r, want_r, **TOL)
    if not whiten_rewards:  # raw GAE: advantages = returns - masked values
        a, r = adv.gae(jnp.asarray(values), jnp.asarray(rewards), jnp.asarray(mask), gamma, lam)
        np.testing.assert_allclose(r, want_r, **TOL)
        np.testing.assert_allclose(a, want_r - want_v, **TOL)


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    """A closed form independent of trl: with gamma = lam = 1, A_t = sum_{s>=t} r_s - V_t on masked rows."""
    r = jnp.asarray([[1.0, 2.0, 3.0, 0.0]])
    v = jnp.asarray([[0.5, 0.25, 0.125, 9.0]])
    m = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
    a, ret = adv.gae(v, r, m, 1.0, 1.0)
    np.testing.assert_allclose(a, [[5.5, 4.75, 2.875, 0.0]])
    np.testing.assert_allclose(ret, [[6.0, 5.0, 3.0, 0.0]])


@pytest.mark.parametrize("adaptive", [True, False])
def test_kl_controller_over_steps_matches_trl(adaptive):
    rng = np.random.default_rng(5)
    ctl = ref.AdaptiveKLController(0.2, 6.0, 10000) if adaptive else ref.FixedKLController(0.2)
    state = adv.init_kl(0.2)
    update = jax.jit(adv.update_kl, static_argnames=("target", "horizon", "adaptive"))
    for kl in [0.0, 3.0, 6.0, 7.1, 50.0, -2.0, *rng.uniform(0, 12, 10)]:
        ctl.update(np.float32(kl), 16)
        state = update(state, jnp.float32(kl), 16, target=6.0, horizon=10000.0, adaptive=adaptive)
        np.testing.assert_allclose(state.value, ctl.value, rtol=1e-6)
    if adaptive:  # it moved, and in the direction the KL asked for
        assert float(state.value) != pytest.approx(0.2)
    assert float(adv.update_kl(adv.init_kl(0.2), 100.0, 16, target=6.0, horizon=10000.0).value) == \
        pytest.approx(0.2 * (1 + 0.2 * 16 / 10000))


def test_mean_sequence_kl_and_bad_kl_mode():
    logp = jnp.asarray([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    refl = jnp.asarray([[-1.5, -2.0, -1.0], [-2.0, -2.0, -2.0]])
    m = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(adv.mean_sequence_kl(logp, refl, m)) == pytest.approx((0.5 + 3.0) / 2)
    with pytest.raises(ValueError, match="kl_penalty='js'"):
        adv.kl_penalty(logp, refl, "js")
