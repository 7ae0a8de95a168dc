"""rre_jax.grpo against trl 1.16.0 (tests/trl_grpo_reference.py): advantages for every ``scale_rewards``, RLOO's
leave-one-out baseline and KL folding, the per-token loss with every ``loss_type`` and the k3 KL, and full
updates of a toy softmax policy against torch autograd + Adam driven like trl's Trainer (``num_iterations``
passes over frozen old log-probs); group statistics across devices; config validation."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

import trl_grpo_reference as ref
from rre_jax import grpo, mesh as mesh_lib, ppo
from rre_jax.errors import UserError

from test_ppo import random_mask, torch_forward, toy_params, jax_forward

torch.set_num_threads(1)
# float32 JAX against float64 references: every quantity is O(1)-O(10) and comes from a handful of float32 ops
# (a mean/std over <= 32 values, exp, a masked sum over <= 64 tokens), a few ulps (~1e-7 relative) each; 1e-5
# leaves two orders of margin and still catches any wrong term, normaliser or epsilon (>= 1e-4 effects).
TOL = dict(rtol=1e-5, atol=1e-5)
B, N, G = 16, 7, 4


def _cfg(**kw):
    base = dict(algo="grpo", num_generations=G, batch_size=B, mini_batch_size=2, gradient_accumulation_steps=2,
                max_completion_length=N)
    return grpo.GroupConfig(**{**base, **kw})


def _rewards(seed, n=B):
    rng = np.random.default_rng(seed)
    r = rng.normal(1.0, 2.0, n)
    r[:G] = 0.5  # one group with zero spread (trl's frac_reward_zero_std, the 1e-4 guard)
    return r


# ---------------------------------------------------------------------------------------------- advantages

@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
def test_grpo_advantages_match_trl(scale):
    r = _rewards(0)
    want, want_std, zero = ref.grpo_advantages(r, G, scale)
    got, got_std = jax.jit(grpo.grpo_advantages, static_argnums=(1, 2))(r.astype(np.float32), G, scale)
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(got_std, want_std, **TOL)
    assert not zero[G:].any() and zero[:G].all() == (scale != "batch")
    assert np.abs(np.asarray(got)[:G]).max() == 0  # equal rewards: no signal, not 0/0


@pytest.mark.parametrize("beta,normalize", [(0.0, False), (0.05, False), (0.3, True)])
def test_rloo_advantages_fold_kl_into_the_reward_as_trl(beta, normalize):
    rng = np.random.default_rng(1)
    r, mask = _rewards(1), random_mask(rng, B, N).astype(np.float64)
    old, ref_logp = -rng.gamma(2.0, 1.0, (2, B, N))
    want, want_r = ref.rloo_advantages(r, G, old, ref_logp, mask, beta, normalize)
    kl = grpo.per_sequence_kl(old.astype(np.float32), ref_logp.astype(np.float32), mask.astype(np.float32))
    got, got_r = grpo.rloo_advantages(jnp.float32(r), G, kl, beta, normalize)
    np.testing.assert_allclose(got_r, want_r, **TOL)
    np.testing.assert_allclose(got, want, **TOL)
    if not normalize:  # each response against the mean of the OTHER G - 1 of its group
        r_ = want_r.reshape(-1, G)
        np.testing.assert_allclose(np.asarray(got)[1], r_[0, 1] - np.delete(r_[0], 1).mean(), **TOL)


# ---------------------------------------------------------------------------------------------- losses

def _loss_inputs(seed):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, B, N)
    old = -rng.gamma(2.0, 1.0, (B, N)).astype(np.float32)
    new = (old + rng.normal(0, 0.3, (B, N))).astype(np.float32)  # ratios well outside [0.8, 1.28]: clips act
    ref_logp = (old + rng.normal(0, 0.3, (B, N))).astype(np.float32)
    adv = rng.normal(0, 1.0, B).astype(np.float32)
    return new, old, ref_logp, adv, mask


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("beta,eps_low,eps_high", [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28)])
def test_grpo_loss_every_aggregation_matches_trl(loss_type, beta, eps_low, eps_high):
    new, old, ref_logp, adv, mask = _loss_inputs(2)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    # trl's loss of one micro-batch of B rows out of a generation batch of 4B rows (spg = 4 slices, K = 2).
    n_items = 3.7 * mask.sum()
    want = ref.grpo_loss(f64(new), f64(old), f64(adv), f64(mask), loss_type=loss_type, epsilon_low=eps_low,
                         epsilon_high=eps_high, beta=beta, ref_per_token_logps=f64(ref_logp),
                         max_completion_length=N, num_items_in_batch=n_items, gradient_accumulation_steps=2,
                         steps_per_generation=4)
    l_BxN, rho = grpo.grpo_token_loss(new, old, adv, eps_low, eps_high, ref_logp, beta)
    got = grpo.aggregate(l_BxN, mask, loss_type, N, dapo_tokens=n_items * B / (4 * B)) / 2  # / K in the update
    np.testing.assert_allclose(got, want, **TOL)
    assert 0 < float(((rho < 1 - eps_low) | (rho > 1 + eps_high)).mean()) < 1  # both clip regimes occur
    if beta:
        k3 = np.exp(f64(ref_logp) - f64(new)) - (f64(ref_logp) - f64(new)) - 1
        np.testing.assert_allclose(grpo.k3_kl(new, ref_logp), k3, **TOL)
        assert k3.min() >= 0


def test_rloo_sequence_loss_matches_trl():
    new, old, _, adv, mask = _loss_inputs(3)
    new = old + (new - old) * 0.3  # sequence ratios near the clip range
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    want = ref.rloo_loss(f64(new), (f64(old) * mask).sum(1), f64(adv), f64(mask), epsilon_low=0.2, epsilon_high=0.3)
    got, rho = grpo.rloo_sequence_loss(new, old, mask, adv, 0.2, 0.3)
    np.testing.assert_allclose(got, want, **TOL)
    assert 0 < float(((rho < 0.8) | (rho > 1.3)).mean()) < 1


# ---------------------------------------------------------------------------------------------- full update

@functools.lru_cache(maxsize=None)
def _update_fn(cfg, max_grad_norm):
    opt = ppo.make_optimizer(ppo.PPOConfig(batch_size=cfg.batch_size, mini_batch_size=cfg.mini_batch_size,
                                           gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                           learning_rate=0.05, max_grad_norm=max_grad_norm))
    return jax.jit(grpo.make_update_step(jax_forward, opt, cfg)), opt


def _batch(seed, params, cfg):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(cfg.batch_size, N, 5)).astype(np.float32)
    a = rng.integers(0, 6, (cfg.batch_size, N)).astype(np.int32)
    logp = np.asarray(jax.jit(jax_forward)(params, {"x": x, "a": a}, None)[0])
    ref_logp = (logp + rng.normal(0, 0.2, logp.shape)).astype(np.float32)
    mask = random_mask(rng, cfg.batch_size, N)
    batch, stats = jax.jit(grpo.prepare_batch, static_argnums=4)(logp, ref_logp, _rewards(seed).astype(np.float32),
                                                                mask, cfg)
    return dict(jax.tree.map(np.array, batch), x=x, a=a), stats


def _run_both(cfg, max_grad_norm=0.5, seed=0):
    params = toy_params(seed)
    batch, _ = _batch(seed + 1, params, cfg)
    rng = jax.random.key(seed)
    update, opt = _update_fn(cfg, max_grad_norm)
    got, _, stats = update(params, opt.init(params), batch, rng)
    perm = np.asarray(grpo.update_indices(jax.random.split(rng)[0], cfg)).reshape(-1)[:cfg.batch_size]
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    forward = torch_forward(batch["x"], batch["a"])
    ref.update(lambda p, rows: forward(p, rows)[0], tparams, {k: batch[k] for k in batch if k not in "xa"},
               perm, cfg, 0.05, max_grad_norm)
    return params, got, {k: v.detach().numpy() for k, v in tparams.items()}, stats


@pytest.mark.parametrize("kw", [
    dict(loss_type="dapo", num_iterations=2),
    dict(loss_type="grpo", beta=0.04, epsilon_high=0.28, scale_rewards="batch"),
    dict(loss_type="bnpo", scale_rewards="none", gradient_accumulation_steps=1, mini_batch_size=4),
    dict(loss_type="dr_grpo", beta=0.1, num_iterations=3),
    dict(algo="rloo", beta=0.05, num_iterations=2),
])
def test_full_update_matches_trl_trainer_loop(kw):
    cfg = _cfg(**kw)
    params, got, want, stats = _run_both(cfg)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=k)
    for k in ("W", "b"):  # the policy trained (the toy's value head gets no gradient: no critic)
        assert np.abs(np.asarray(got[k]) - params[k]).max() > 1e-3
    steps = cfg.num_iterations * cfg.steps_per_iteration
    assert float(stats[f"{cfg.algo}/skipped_steps"]) == 0 and steps > 1
    if cfg.num_iterations > 1:  # later passes see the frozen old log-probs: the ratio leaves 1 and clips
        assert float(stats[f"{cfg.algo}/clip_ratio/region_mean"]) > 0


# ---------------------------------------------------------------------------------------------- groups on a mesh

def test_group_statistics_span_devices():
    """Groups of 4 rows on a batch sharded 2 rows per device: every group spans two devices. The sharded jit
    equals trl's whole-group statistics; the same maths applied per device (shard_map) does not."""
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(8, 1, 1)))
    r = _rewards(4).astype(np.float32)
    sharded = jax.device_put(r, NamedSharding(mesh, P("data")))
    assert {len(s.data) for s in sharded.addressable_shards} == {2}
    for scale in grpo.SCALE_REWARDS:
        want = ref.grpo_advantages(r.astype(np.float64), G, scale)[0]
        got = jax.jit(grpo.grpo_advantages, static_argnums=(1, 2))(sharded, G, scale)[0]
        np.testing.assert_allclose(got, want, **TOL, err_msg=scale)
    want = ref.rloo_advantages(r.astype(np.float64), G)[0]
    np.testing.assert_allclose(jax.jit(grpo.rloo_advantages, static_argnums=1)(sharded, G)[0], want, **TOL)
    # Per-device statistics (groups cut at device boundaries) are wrong, and this comparison would see it.
    per_device = jax.shard_map(lambda x: grpo.grpo_advantages(x, 2, "group")[0], mesh=mesh, in_specs=P("data"),
                           out_specs=P("data"))(sharded)
    assert np.abs(np.asarray(per_device) - ref.grpo_advantages(r.astype(np.float64), G, "group")[0]).max() > 0.1


def test_update_runs_sharded_like_one_device():
    cfg = _cfg(loss_type="dapo", beta=0.04, num_iterations=2)
    params = toy_params(0)
    batch, _ = _batch(1, params, cfg)
    update, opt = _update_fn(cfg, 0.5)
    p_ref, _, s_ref = update(params, opt.init(params), batch, jax.random.key(0))
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(4, 2, 1)))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for k, v in batch.items()}
    p_sh, _, s_sh = update(params, opt.init(params), sharded, jax.random.key(0))
    for a, b in zip(jax.tree.leaves((p_sh, s_sh)), jax.tree.leaves((p_ref, s_ref))):
        np.testing.assert_allclose(a, b, **TOL)


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw,match", [
    (dict(num_generations=1), r"config.group.num_generations=1.*at least 2"),
    (dict(num_generations=3), r"config.ppo.batch_size=16.*not divisible into groups.*num_generations=3"),
    (dict(beta=-0.1), r"config.group.beta=-0.1"),
    (dict(epsilon_high=-1.0), r"config.group.epsilon_high"),
    (dict(scale_rewards="std"), r"config.group.scale_rewards='std'.*'group', 'batch', 'none'"),
    (dict(loss_type="cispo"), r"config.group.loss_type='cispo'"),
    (dict(num_iterations=0), r"config.group.num_iterations=0"),
])
def test_bad_group_config_names_the_field(kw, match):
    with pytest.raises(UserError, match=match):
        _cfg(**kw)


def test_config_from_section_takes_the_ppo_layout():
    pcfg = ppo.PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2)
    cfg = grpo.GroupConfig.from_config({"num_generations": 2, "beta": 0.1}, "rloo", pcfg, 48)
    assert (cfg.batch_size, cfg.prompts_per_step, cfg.steps_per_iteration, cfg.max_completion_length) == (8, 4, 2, 48)
    with pytest.raises(UserError, match="unknown field.*'epsilon'"):
        grpo.GroupConfig.from_config({"epsilon": 0.2}, "grpo", pcfg, 48)
    assert dataclasses.replace(cfg, beta=0.0).needs_reference is False
