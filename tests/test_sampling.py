"""Sampling filters against transformers' logits processors (temperature, top-k, top-p)."""
import jax
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from rre_jax import backend, sampling


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0),
                                                     (1.0, 0, 0.9), (0.7, 20, 0.8), (1.3, 3, 0.5)])
def test_filter_matches_transformers(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 50)) * 3).astype(np.float32)
    logits[0, :10] = 1.0  # ties at the top-k boundary behave as transformers (keep all tied)
    cfg = sampling.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(jax.jit(lambda x: sampling.filter_logits(x, cfg))(logits))
    t = torch.from_numpy(logits)
    t = TemperatureLogitsWarper(temperature)(None, t)
    if top_k:
        t = TopKLogitsWarper(top_k)(None, t)
    if top_p < 1.0:
        t = TopPLogitsWarper(top_p)(None, t)
    want = t.numpy()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_sample_distribution_and_greedy():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
    cfg = sampling.SamplingConfig(top_p=0.7)  # keeps tokens 0 and 1 only
    draws = jax.vmap(lambda r: sampling.sample(r, logits, cfg))(jax.random.split(jax.random.key(0), 4000))
    freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / 4000
    assert freq[2] == 0 and abs(freq[0] - 0.625) < 0.03
    assert int(sampling.sample(None, logits, sampling.SamplingConfig(greedy=True))[0]) == 0
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingConfig(top_p=0.0)


def test_argmax_is_jnp_argmax_with_ties_nan_and_inf():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 3000)).astype(np.float32)
    x[1, [5, 17, 2999]] = 50.0  # ties: the first index wins
    x[2] = 1.0  # all tied
    x[3, :] = -np.inf  # fully filtered row
    x[4, 100:] = -np.inf
    x[5, [7, 40]] = np.nan  # NaN wins, the first one (jnp.argmax semantics)
    x[6, [3, 9]] = np.inf
    x[7] = np.round(x[7])  # many ties at the max
    x[8, -1] = 9.0  # last index
    got = np.asarray(jax.jit(backend.argmax)(x))
    want = np.asarray(jax.numpy.argmax(x, axis=-1))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[:7], [got[0], 5, 0, 0, want[4], 7, 3])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.0, 0, 0.8)])
def test_sample_is_bit_identical_to_jax_categorical(temperature, top_k, top_p):
    rng = np.random.default_rng(2)
    logits = jax.numpy.asarray((rng.standard_normal((8, 4000)) * 2).astype(np.float32))
    cfg = sampling.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = jax.jit(jax.vmap(lambda k, x: sampling.sample(k, x, cfg), (0, None)))
    ref = jax.jit(jax.vmap(lambda k, x: jax.random.categorical(k, sampling.filter_logits(x, cfg), axis=-1),
                           (0, None)))
    keys = jax.random.split(jax.random.key(7), 32)
    a, b = np.asarray(ours(keys, logits)), np.asarray(ref(keys, logits))
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) > 50  # real draws, not one constant token
