"""From a scored rollout to per-token advantages: score normalisation, KL shaping, GAE, whitening.

Semantics are those of trl 0.7.4's ``PPOTrainer`` (the reference's PPO stack; docs/design.md section 4.4);
``tests/trl_reference.py`` is a NumPy port of it and the tests hold every function here to it.

Shape letters: ``B`` batch (sequences), ``T`` token positions of the response window, ``V`` vocabulary.
``mask_BxT`` is 1 on the response tokens that count and 0 elsewhere (padding, cut text); masks may be float or
int. All functions are pure and jittable; controller and moment states are small NamedTuple pytrees.

Equations (``m`` = mask, ``<x>`` = masked mean = ``sum(x*m) / sum(m)``):

* Score moments (Chan's parallel merge; init mean 0, var 1, std 1, count 1e-24). For a batch of ``n`` scores with
  mean ``mu_b`` and population variance ``var_b``::

      d = mu_b - mean;  N = count + n
      var' = (var*count + d^2*count*n/N + var_b*n) / N;  mean' = mean + d*n/N
      std' = sqrt(var' * N / (N - 1));  count' = N

* Score scaling (after the moments have absorbed the batch), then clipping::

      s = (s - mean) / (std + eps)   (use_score_norm)   or   s = s / (std + eps);   s = clip(s, -c, c)

  with ``eps`` the machine epsilon of the score dtype.
* KL per token ``k_t`` (``kl_penalty``): ``'kl'``: ``logp_t - ref_t``; ``'abs'``: ``|logp_t - ref_t|``; ``'mse'``:
  ``0.5 (logp_t - ref_t)^2``; ``'full'``: ``sum_v p_tv (logp_tv - ref_tv)`` over full log-softmaxes ``BxTxV``.
* Shaped reward: ``r_t = -beta * k_t``, plus the (scaled) score on the LAST position where ``m = 1``.
* GAE over every position, with ``V`` and ``r`` first multiplied by the mask and ``V_T = 0``::

      delta_t = r_t + gamma V_{t+1} - V_t;   A_t = delta_t + gamma lam A_{t+1};   R_t = A_t + V_t

* Whitening: ``var`` = masked variance with Bessel's correction ``sum(m) / (sum(m) - 1)``;
  ``w(x) = (x - <x>) / sqrt(var + 1e-8)`` (``shift_mean=False`` adds ``<x>`` back).
  Advantages are whitened over the whole batch once, before any update, and then held fixed.
* Adaptive KL (Ziegler et al. 2019): ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta *= 1 + e * n / horizon``,
  ``KL`` = batch mean of the per-sequence summed KL, ``n`` = global batch size.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_PENALTIES = ("kl", "abs", "mse", "full")


# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------

def masked_mean(x, mask, axis=None):
    """``sum(x*m) / sum(m)`` over ``axis`` (all axes when None)."""
    mask = mask.astype(x.dtype)
    return (x * mask).sum(axis=axis) / mask.sum(axis=axis)


def masked_var(x, mask, unbiased: bool = True):
    """Masked variance over all entries; ``unbiased`` multiplies by ``sum(m) / (sum(m) - 1)`` as trl does.

    With a single counted token the correction divides by zero (trl raises; here the result is inf/nan).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.astype(x.dtype).sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean: bool = True):
    """``(x - <x>) / sqrt(var + 1e-8)`` with the unbiased masked variance; every entry is transformed."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


# ----------------------------------------------------------------------------------------------------------------
# Running score moments and score scaling
# ----------------------------------------------------------------------------------------------------------------

class ScoreMoments(NamedTuple):
    """Running mean / variance of raw scores over all rollouts so far (trl's ``RunningMoments``)."""
    mean: jax.Array
    var: jax.Array
    std: jax.Array
    count: jax.Array


def init_moments() -> ScoreMoments:
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return ScoreMoments(mean=f(0.0), var=f(1.0), std=f(1.0), count=f(1e-24))


def update_moments(moments: ScoreMoments, score_B):
    """Merge one batch of raw scores into the moments (equations in the module docstring).

    Returns ``(new_moments, batch_mean, batch_std)`` where ``batch_std`` has Bessel's correction. A sharded
    ``score_B`` is reduced globally by XLA, which matches trl's cross-process ``get_global_statistics``.
    """
    x = score_B.astype(jnp.float32)
    n = jnp.asarray(x.size, jnp.float32)
    mu_b, var_b = x.mean(), x.var()
    delta = mu_b - moments.mean
    total = moments.count + n
    old_sum = moments.var * moments.count + delta**2 * moments.count * n / total
    var = (old_sum + var_b * n) / total
    new = ScoreMoments(mean=moments.mean + delta * n / total, var=var,
                       std=jnp.sqrt(var * total / (total - 1)), count=total)
    return new, mu_b, jnp.sqrt(var_b * n / (n - 1))


def normalize_scores(score_B, moments: ScoreMoments, use_norm: bool = True):
    """``(s - mean) / (std + eps)`` (or ``s / (std + eps)`` without norm), eps = machine epsilon of the dtype."""
    dtype = score_B.dtype
    scale = moments.std.astype(dtype) + jnp.finfo(dtype).eps
    if use_norm:
        return (score_B - moments.mean.astype(dtype)) / scale
    return score_B / scale


def scale_scores(moments: ScoreMoments, score_B, *, scaling: bool, norm: bool, clip: float | None):
    """trl's score pipeline: update moments and normalise (when ``scaling``), then clip to ``[-clip, clip]``.

    Returns ``(moments, scaled_score_B)``; the moments are returned unchanged when scaling is off.
    """
    if scaling:
        moments, _, _ = update_moments(moments, score_B)
        score_B = normalize_scores(score_B, moments, norm)
    if clip is not None:
        score_B = jnp.clip(score_B.astype(jnp.float32), -clip, clip).astype(score_B.dtype)
    return moments, score_B


# ----------------------------------------------------------------------------------------------------------------
# KL-shaped rewards
# ----------------------------------------------------------------------------------------------------------------

def kl_penalty(logp, ref_logp, mode: str = "kl"):
    """Per-token KL estimate ``k_t``. ``'full'`` takes full log-softmaxes ``BxTxV`` and sums over the vocabulary."""
    if mode == "kl":
        return logp - ref_logp
    if mode == "abs":
        return jnp.abs(logp - ref_logp)
    if mode == "mse":
        return 0.5 * (logp - ref_logp) ** 2
    if mode == "full":
        return jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)
    raise ValueError(f"kl_penalty={mode!r} is not one of {KL_PENALTIES}; set ppo.kl_penalty to one of them")


def last_token_onehot(mask_BxT):
    """One-hot ``BxT`` of the last position with ``mask = 1`` per row (all zero for an empty row)."""
    m = mask_BxT != 0
    T = m.shape[-1]
    last_B = T - 1 - jnp.argmax(m[:, ::-1], axis=-1)
    onehot = jnp.arange(T)[None, :] == last_B[:, None]
    return onehot & m.any(axis=-1, keepdims=True)


def shaped_rewards(logp_BxT, ref_logp_BxT, score_B, mask_BxT, beta, kl_mode: str = "kl"):
    """Per-token rewards ``r_t = -beta k_t`` plus ``score`` on the last counted token.

    Returns ``(reward_BxT, non_score_reward_BxT)``. Like trl, the KL term is not masked here (GAE masks it);
    a row with an empty mask receives no score (trl would raise on it).
    """
    non_score_BxT = -beta * kl_penalty(logp_BxT, ref_logp_BxT, kl_mode)
    onehot_BxT = last_token_onehot(mask_BxT).astype(non_score_BxT.dtype)
    return non_score_BxT + onehot_BxT * score_B[:, None].astype(non_score_BxT.dtype), non_score_BxT


# ----------------------------------------------------------------------------------------------------------------
# GAE and advantages
# ----------------------------------------------------------------------------------------------------------------

def _gae_scan(values_BxT, rewards_BxT, gamma: float, lam: float):
    """GAE over already-masked values and rewards by a reverse ``lax.scan``; ``V_T = 0``."""
    next_values = jnp.concatenate([values_BxT[:, 1:], jnp.zeros_like(values_BxT[:, :1])], axis=1)
    delta_TxB = (rewards_BxT + gamma * next_values - values_BxT).T

    def step(carry_B, delta_B):
        adv_B = delta_B + gamma * lam * carry_B
        return adv_B, adv_B

    _, adv_TxB = jax.lax.scan(step, jnp.zeros_like(delta_TxB[0]), delta_TxB, reverse=True)
    return adv_TxB.T


def gae(values_BxT, rewards_BxT, mask_BxT, gamma: float, lam: float):
    """Generalised advantage estimation by a reverse ``lax.scan`` over positions (equations above).

    ``values`` and ``rewards`` are multiplied by the mask first, and the value after the last position is 0,
    exactly as trl's loop. Returns ``(advantages_BxT, returns_BxT)``, not whitened.
    """
    mask = mask_BxT.astype(values_BxT.dtype)
    values = values_BxT * mask
    adv_BxT = _gae_scan(values, rewards_BxT * mask, gamma, lam)
    return adv_BxT, adv_BxT + values


def compute_advantages(values_BxT, rewards_BxT, mask_BxT, gamma: float, lam: float, whiten_rewards: bool = False):
    """trl's ``compute_advantages``: returns ``(masked_values, whitened_advantages, returns)``, all ``BxT``.

    The masked values are what the losses use as old values; ``returns`` are built from the raw advantages.
    With ``whiten_rewards`` the masked rewards are whitened (mean kept) and, as in trl, not re-masked.
    """
    mask = mask_BxT.astype(values_BxT.dtype)
    values, rewards = values_BxT * mask, rewards_BxT * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    adv_BxT = _gae_scan(values, rewards, gamma, lam)
    returns_BxT = adv_BxT + values
    return values, jax.lax.stop_gradient(masked_whiten(adv_BxT, mask)), returns_BxT


# ----------------------------------------------------------------------------------------------------------------
# KL coefficient controller
# ----------------------------------------------------------------------------------------------------------------

class KLState(NamedTuple):
    """The current KL coefficient ``beta`` (a float32 scalar, so it can live in the train state)."""
    value: jax.Array


def init_kl(init_kl_coef: float) -> KLState:
    return KLState(value=jnp.asarray(init_kl_coef, jnp.float32))


def update_kl(state: KLState, current_kl, n_steps, *, target: float, horizon: float, adaptive: bool = True):
    """Adaptive: ``beta *= 1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon``; fixed: unchanged."""
    if not adaptive:
        return state
    err = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return KLState(value=state.value * (1.0 + err * n_steps / horizon))


def mean_sequence_kl(logp_BxT, ref_logp_BxT, mask_BxT):
    """``KL`` for the controller and logs: ``mean_b sum_t (logp - ref) m`` (trl's ``objective/kl``)."""
    mask = mask_BxT.astype(logp_BxT.dtype)
    return ((logp_BxT - ref_logp_BxT) * mask).sum(axis=-1).mean()
