"""rre_jax.ppo against trl 0.7.4 (tests/trl_reference.py): losses and stats, the batch preparation, and a full
update of a toy softmax policy against torch autograd + torch.optim.Adam driven like trl's step loop."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

import trl_reference as ref
from rre_jax import advantages as adv
from rre_jax import mesh as mesh_lib
from rre_jax import ppo

torch.set_num_threads(1)
TOL = dict(rtol=1e-5, atol=1e-5)
B, T, D, V = 8, 7, 5, 6


def random_mask(rng, B, T):
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        start = int(rng.integers(0, 2))
        mask[b, start:start + int(rng.integers(3, T - start + 1))] = 1.0
    return mask


# ---------------------------------------------------------------------------------------------- losses

def _loss_inputs(seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, 6, 9)
    old_logp = -rng.gamma(2.0, 1.0, (6, 9)).astype(np.float32)
    new_logp = (old_logp + rng.normal(0, 0.3, (6, 9)) + shift).astype(np.float32)
    old_v, adv_, ret = rng.normal(size=(3, 6, 9)).astype(np.float32)
    new_v = (old_v + rng.normal(0, 0.4, (6, 9))).astype(np.float32)
    logits = rng.normal(size=(6, 9, 11)).astype(np.float32)
    return dict(new_logp=new_logp, new_v=new_v, old_logp=old_logp, old_v=old_v, adv=adv_, ret=ret, mask=mask,
                logits=logits)


def _both_losses(x, cfg):
    t = {k: torch.as_tensor(v) for k, v in x.items()}
    pg, vf, want = ref.loss(t["old_logp"], t["old_v"], t["logits"], t["new_v"], t["new_logp"], t["mask"],
                            t["adv"], t["ret"], cfg)
    entropy = jax.scipy.special.logsumexp(x["logits"], -1) - (jax.nn.softmax(x["logits"]) * x["logits"]).sum(-1)
    loss, got = jax.jit(ppo.ppo_losses, static_argnums=7)(
        x["new_logp"], x["new_v"], x["old_logp"], x["old_v"], x["adv"], x["ret"], x["mask"], cfg, entropy)
    return float(pg + vf), want, float(loss), got


@pytest.mark.parametrize("cliprange,cliprange_value,vf_coef", [(0.2, 0.2, 1.0), (0.1, 0.05, 0.1)])
def test_ppo_losses_and_every_stat_match_trl(cliprange, cliprange_value, vf_coef):
    cfg = ppo.PPOConfig(cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef)
    want_loss, want, loss, got = _both_losses(_loss_inputs(0), cfg)
    assert set(got) == set(want)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=k)
    # Both clips bite on these inputs, so clipfracs are informative.
    assert 0 < want["policy/clipfrac"] < 1 and 0 < want["val/clipfrac"] < 1 and want["policy/skipped"] == 0


def test_ratio_threshold_zeroes_loss_and_gradient():
    cfg = ppo.PPOConfig()
    x = _loss_inputs(1, shift=3.0)  # mean ratio ~ e^3 = 20 > 10
    want_loss, want, loss, got = _both_losses(x, cfg)
    assert want["policy/skipped"] == 1 and float(got["policy/skipped"]) == 1
    assert loss == 0 and want_loss == 0
    for k in want:
        np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=k)
    grads = jax.grad(lambda lp, v: ppo.ppo_losses(lp, v, x["old_logp"], x["old_v"], x["adv"], x["ret"],
                                                  x["mask"], cfg)[0], argnums=(0, 1))(x["new_logp"], x["new_v"])
    assert all(float(jnp.abs(g).max()) == 0 for g in grads)
    # The same minibatch under a higher threshold trains.
    _, want_hi, loss_hi, got_hi = _both_losses(x, dataclasses.replace(cfg, ratio_threshold=100.0))
    assert loss_hi != 0 and float(got_hi["policy/skipped"]) == 0
    np.testing.assert_allclose(got_hi["loss/total"], want_hi["loss/total"], **TOL)


# ------------------------------------------------------------------------------- toy policy + batch

def toy_params(seed):
    rng = np.random.default_rng(seed)
    return {"W": rng.normal(0, 0.5, (D, V)).astype(np.float32), "b": rng.normal(0, 0.1, V).astype(np.float32),
            "wv": rng.normal(0, 0.5, D).astype(np.float32), "bv": np.float32(0.1)}


TRACES = []  # one entry per trace of jax_forward


def jax_forward(params, mb, rng):
    del rng  # deterministic, like trl's eval-mode training forward
    TRACES.append(1)
    logits = mb["x"] @ params["W"] + params["b"]
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, mb["a"][..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    return logp, mb["x"] @ params["wv"] + params["bv"], entropy


def torch_forward(x, a):
    x, a = torch.as_tensor(x), torch.as_tensor(a).long()

    def forward(params, rows):
        logits = x[rows] @ params["W"] + params["b"]
        logp = torch.gather(torch.log_softmax(logits, -1), 2, a[rows].unsqueeze(2)).squeeze(-1)
        return logp, logits, x[rows] @ params["wv"] + params["bv"]
    return forward


def _rollout(seed, params, cfg, kl_coef=0.05):
    """A scored 'rollout' of the toy policy: inputs, old logp/values from the same params, ref logp, scores."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(cfg.batch_size, T, D)).astype(np.float32)
    a = rng.integers(0, V, (cfg.batch_size, T)).astype(np.int32)
    logp, values, _ = jax.jit(jax_forward)(params, {"x": x, "a": a}, None)
    logp, values = np.asarray(logp), np.asarray(values)
    ref_logp = (logp + rng.normal(0, 0.2, logp.shape)).astype(np.float32)
    score = rng.normal(1.0, 2.0, cfg.batch_size).astype(np.float32)
    mask = random_mask(rng, cfg.batch_size, T)
    batch, moments, stats = jax.jit(ppo.prepare_batch, static_argnums=7)(
        logp, ref_logp, values, score, mask, adv.init_moments(), adv.init_kl(kl_coef), cfg)
    batch = dict(jax.tree.map(np.array, batch), x=x, a=a)  # writable copies
    return batch, dict(logp=logp, ref_logp=ref_logp, values=values, score=score, mask=mask), stats


def test_prepare_batch_matches_trl_step_preamble():
    cfg = ppo.PPOConfig(batch_size=B, mini_batch_size=2, gradient_accumulation_steps=2, score_clip=1.5)
    batch, raw, stats = _rollout(0, toy_params(0), cfg)
    running = ref.RunningMoments()
    scores = ref.scale_scores(running, raw["score"], True, True, 1.5)
    rewards, non_score = ref.compute_rewards(scores, raw["logp"], raw["ref_logp"], raw["mask"], 0.05)
    values, advantages, returns = ref.compute_advantages(raw["values"], rewards, raw["mask"], 1.0, 0.95)
    for k, want in dict(old_logp=raw["logp"], old_values=values, advantages=advantages, returns=returns).items():
        np.testing.assert_allclose(batch[k], want, **TOL, err_msg=k)
    want_stats = ref.record_step_stats(scores, raw["logp"], raw["ref_logp"], non_score, raw["mask"], 0.05)
    for k, v in want_stats.items():
        np.testing.assert_allclose(stats[k], v, **TOL, err_msg=k)
    assert np.abs(scores).max() == pytest.approx(1.5)  # the clip acted
    # The controller step after the update, fed trl's objective/kl with n = batch size.
    ctl = ref.AdaptiveKLController(0.05, cfg.kl_target, cfg.kl_horizon)
    kl = adv.init_kl(0.05)
    for _ in range(3):
        ctl.update(want_stats["objective/kl"] * 400, cfg.batch_size)  # scaled up so the controller moves a lot
        kl = ppo.update_kl_coef(kl, stats["objective/kl"] * 400, cfg)
        np.testing.assert_allclose(kl.value, ctl.value, rtol=1e-6)
    assert float(kl.value) != pytest.approx(0.05)


# ---------------------------------------------------------------------------------------- full update

@functools.lru_cache(maxsize=None)
def _update_fn(cfg):
    """(jitted update, optimizer) per config, so tests sharing a config compile once."""
    opt = ppo.make_optimizer(cfg)
    return jax.jit(ppo.make_update_step(jax_forward, opt, cfg)), opt


# Shared by the frozen-old, non-finite and compile-once tests.
CFG_SGD = ppo.PPOConfig(batch_size=B, mini_batch_size=2, gradient_accumulation_steps=1, ppo_epochs=2,
                        learning_rate=0.05, max_grad_norm=None)


def _run_both(cfg, seed=0, recompute_old=False):
    params = toy_params(seed)
    batch, _, _ = _rollout(seed + 1, params, cfg)
    rng = jax.random.key(seed)
    update, opt = _update_fn(cfg)
    new_params, _, stats = update(params, opt.init(params), batch, rng)
    perms = np.asarray(ppo.minibatch_indices(jax.random.split(rng)[0], cfg)).reshape(cfg.ppo_epochs, -1)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    all_stats = ref.step_update(torch_forward(batch["x"], batch["a"]), tparams, batch, perms, cfg, recompute_old)
    want_params = {k: v.detach().numpy() for k, v in tparams.items()}
    return params, new_params, stats, want_params, ref.mean_stats(all_stats)


@pytest.mark.parametrize("ratio_threshold", [10.0, 1.03])
def test_full_update_matches_trl_step_loop(ratio_threshold):
    cfg = ppo.PPOConfig(batch_size=B, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=3,
                        learning_rate=0.05, max_grad_norm=0.5, ratio_threshold=ratio_threshold)
    params, got_params, got, want_params, want = _run_both(cfg)
    for k in params:
        np.testing.assert_allclose(got_params[k], want_params[k], **TOL, err_msg=k)
        assert np.abs(np.asarray(got_params[k]) - params[k]).max() > 1e-3  # it trained
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, **TOL, err_msg=k)
    assert float(got["ppo/skipped_nonfinite"]) == 0 and float(got["ppo/skipped_steps"]) == 0
    if ratio_threshold < 2:
        assert 0 < float(got["ppo/skipped_ratio"]) < cfg.ppo_epochs * B // cfg.mini_batch_size


def test_old_logprobs_and_values_stay_frozen_across_epochs():
    """With frozen old values the ratio leaves 1 after the first optimizer step, so approxkl and clipfrac are
    positive and match trl. The reference run with old values recomputed per minibatch (the known JAX-port bug)
    has ratio == 1 everywhere: zero approxkl, zero clipfrac and different parameters, which this test rejects."""
    cfg = CFG_SGD
    _, got_params, got, want_params, want = _run_both(cfg, seed=3)
    _, _, _, bug_params, bug = _run_both(cfg, seed=3, recompute_old=True)
    assert float(got["ppo/policy/approxkl"]) > 1e-3 and float(got["ppo/policy/clipfrac"]) > 0
    assert bug["ppo/policy/approxkl"] == 0 and bug["ppo/policy/clipfrac"] == 0
    for k in ("ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/policy/ratio_mean", "ppo/val/clipfrac"):
        np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=k)
        assert abs(float(got[k]) - bug[k]) > 1e-4, k
    assert max(np.abs(np.asarray(got_params[k]) - bug_params[k]).max() for k in bug_params) > 1e-3


def test_nonfinite_minibatch_is_skipped_and_counted():
    cfg = CFG_SGD
    params = toy_params(0)
    batch, _, _ = _rollout(1, params, cfg)
    batch["advantages"][3, :] = np.nan  # poisons the one minibatch holding row 3, in each epoch
    update, opt = _update_fn(cfg)
    new_params, _, stats = update(params, opt.init(params), batch, jax.random.key(0))
    assert float(stats["ppo/skipped_nonfinite"]) == 2 and float(stats["ppo/skipped_steps"]) == 2
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(new_params))
    assert all(np.isfinite(float(v)) for v in stats.values())
    # A step made only of the poisoned minibatch leaves parameters and optimizer state exactly as they were.
    one = dataclasses.replace(cfg, batch_size=2, ppo_epochs=1)
    small = {k: v[2:4] for k, v in batch.items()}
    state = opt.init(params)
    p1, s1, st1 = _update_fn(one)[0](params, state, small, jax.random.key(0))
    assert float(st1["ppo/skipped_steps"]) == 1
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((params, state))):
        np.testing.assert_array_equal(a, b)


def test_update_compiles_once_and_runs_sharded():
    cfg = CFG_SGD
    update, opt = _update_fn(cfg)
    params = toy_params(0)
    batch, _, _ = _rollout(1, params, cfg)
    p_ref, _, s_ref = update(params, opt.init(params), batch, jax.random.key(0))
    n = len(TRACES)
    batch2, _, _ = _rollout(2, params, cfg)
    update(params, opt.init(params), batch2, jax.random.key(1))
    assert len(TRACES) == n  # new data and a new rng: no retrace
    # The same update with the batch sharded over 8 devices on ('data', 'fsdp') gives the same result.
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(4, 2, 1)))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for k, v in batch.items()}
    p_sh, _, s_sh = update(params, opt.init(params), sharded, jax.random.key(0))
    for a, b in zip(jax.tree.leaves((p_sh, s_sh)), jax.tree.leaves((p_ref, s_ref))):
        np.testing.assert_allclose(a, b, **TOL)


def test_update_rejects_bad_batch():
    cfg = ppo.PPOConfig(batch_size=B, mini_batch_size=2, gradient_accumulation_steps=2)
    update = ppo.make_update_step(jax_forward, ppo.make_optimizer(cfg), cfg)
    params = toy_params(0)
    batch, _, _ = _rollout(1, params, cfg)
    with pytest.raises(KeyError, match="old_values"):
        update(params, None, {k: v for k, v in batch.items() if k != "old_values"}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\['returns'\].*batch_size=8"):
        update(params, None, dict(batch, returns=batch["returns"][:4]), jax.random.key(0))


# --------------------------------------------------------------------------------------------- config

def test_config_defaults_are_the_papers_run_and_bad_values_are_named():
    cfg = ppo.PPOConfig()
    assert (cfg.batch_size, cfg.mini_batch_size, cfg.gradient_accumulation_steps, cfg.backward_batch_size) == \
        (16, 2, 4, 8)
    assert (cfg.ppo_epochs, cfg.learning_rate, cfg.max_grad_norm, cfg.vf_coef, cfg.score_clip) == \
        (4, 1e-5, 1.0, 1.0, 10.0)
    assert ppo.PPOConfig.from_config({"ppo_epochs": 2}).ppo_epochs == 2
    for bad, match in [(dict(batch_size=12), "ppo.batch_size=12.*multiple"), (dict(gamma=0.0), "ppo.gamma"),
                       (dict(lam=1.5), "ppo.lam"), (dict(cliprange=0.0), "ppo.cliprange"),
                       (dict(kl_penalty="full"), "ppo.kl_penalty"), (dict(max_grad_norm=-1.0), "ppo.max_grad_norm"),
                       (dict(mini_batch_size=0), "ppo.mini_batch_size"),
                       (dict(use_score_scaling=False), "ppo.use_score_norm")]:
        with pytest.raises(ValueError, match=match):
            ppo.PPOConfig(**bad)
    with pytest.raises(ValueError, match="unknown field.*'epochs'"):
        ppo.PPOConfig.from_config({"epochs": 2})
