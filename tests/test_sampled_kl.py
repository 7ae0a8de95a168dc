"""Sampled KL(pi || pi_ref) of the sampling distribution: zero for a policy against itself, and the exact KL --
enumerated over every response of a tiny-vocabulary Llama -- within its standard error for a perturbed one."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from rre_jax import policy, rollout, sampled_kl, sampling
from rre_jax.models import llama, lora as lora_lib

V, N = 6, 3
CFG = llama.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
LCFG = lora_lib.LoraConfig(rank=2, alpha=8.0, dropout=0.0)
SPEC = policy.PolicySpec(CFG, "lora", LCFG)
SCFG = sampling.SamplingConfig(temperature=0.7, max_new_tokens=N)
PROMPT = np.array([[0, 2, 3, 1]], np.int32)  # left padded with 0 (the pad id)


FULL = policy.PolicySpec(CFG, "full")


def _lora_models():
    """A fresh LoRA policy (B = 0): the adapted network is its own reference."""
    return {"lora": lora_lib.init(CFG, LCFG, jax.random.key(1))}, llama.init_params(CFG, jax.random.key(0))


def _full_models():
    """Full fine-tuning: the policy is the reference's weights plus noise (the reference is the frozen start)."""
    frozen = llama.init_params(CFG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(frozen)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [x + 0.15 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return {"policy": jax.tree.unflatten(tree, noisy)}, frozen


def _sample(spec, trainable, frozen, rows: int):
    ids = np.repeat(PROMPT, rows, 0)
    mask = (ids != 0).astype(np.int32)
    params, lora = policy.sampling_params(spec, trainable, frozen)
    lcfg = spec.lora_cfg if lora is not None else None
    sample = jax.jit(lambda p, i, m, r, lo: rollout.sample(CFG, p, i, m, r, SCFG, eos_id=-1, pad_id=0, lora=lo,
                                                           lora_cfg=lcfg))
    roll = sample(params, ids, mask, jax.random.key(3), lora)
    return jnp.concatenate([ids, roll.tokens_BxN], 1), jnp.concatenate([mask, roll.mask_BxN], 1)


def test_policy_against_itself_is_zero():
    trainable, frozen = _lora_models()
    ids, mask = _sample(SPEC, trainable, frozen, 64)
    ratio = np.asarray(jax.jit(sampled_kl.log_ratio, static_argnums=(0, 5, 6))(SPEC, trainable, frozen, ids, mask, PROMPT.shape[1], SCFG))
    assert np.all(ratio == 0.0)  # adding a zero adapter changes no bit
    assert sampled_kl.estimate(ratio)["kl"] == 0.0


def test_estimate_matches_exact_kl_by_enumeration():
    trainable, frozen = _full_models()
    T = PROMPT.shape[1]
    # exact: every one of the V^N responses (no EOS: all run N tokens), KL = sum_y q(y) (log q(y) - log p(y))
    every = np.array(list(itertools.product(range(V), repeat=N)), np.int32)
    ids = np.concatenate([np.repeat(PROMPT, len(every), 0), every], 1)
    mask = (np.arange(T + N)[None] >= 1).astype(np.int32).repeat(len(every), 0)
    lq, lp = (np.asarray(x, np.float64) for x in
              jax.jit(sampled_kl.sequence_logps, static_argnums=(0, 5, 6))(FULL, trainable, frozen, ids, mask, T,
                                                                            SCFG))
    q = np.exp(lq)
    assert abs(q.sum() - 1.0) < 1e-5  # the enumerated responses carry all of the tempered policy's mass
    exact = float(np.sum(q * (lq - lp)))
    assert exact > 0.05  # the perturbation is large enough for the comparison to mean something
    ids, mask = _sample(FULL, trainable, frozen, 2048)
    est = sampled_kl.estimate(jax.jit(sampled_kl.log_ratio, static_argnums=(0, 5, 6))(FULL, trainable, frozen, ids, mask, T, SCFG))
    # the estimator is unbiased: within 4 standard errors (a 6e-5 two-sided chance of failing for a correct one)
    assert est["n"] == 2048 and abs(est["kl"] - exact) < 4 * est["stderr"], (est, exact)
    assert est["stderr"] < 0.2 * exact  # informative
