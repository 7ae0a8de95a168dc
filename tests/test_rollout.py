"""The jitted sampler (the one decode loop): greedy is the argmax, EOS early exit, masks, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rre_jax import mesh as mesh_lib, rollout, sampling
from rre_jax.models import llama, lora as lora_lib

CFG = llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _prompts():
    ids = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 3, 4]], np.int32)
    return ids, (ids != 0).astype(np.int32)


def test_greedy_rollout_is_the_argmax_of_a_full_forward_pass():
    """Greedy sampling (the decode loop behind ``rollout.greedy``; transformers' ``generate`` parity is in
    test_llama_decode) picks, at every step, the argmax of a teacher-forced forward over prompt + response."""
    params = llama.init_params(CFG, jax.random.key(0))
    ids, mask = _prompts()
    scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=12)
    out = rollout.jitted_sampler(CFG, scfg, eos_id=None, pad_id=0)(params, ids, mask, jax.random.key(1), None)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN),
                                  np.asarray(rollout.greedy(CFG, params, jnp.asarray(ids), jnp.asarray(mask), 12)))
    assert int(out.steps) == 12 and np.all(np.asarray(out.mask_BxN) == 1)
    full = jnp.concatenate([ids, out.tokens_BxN], 1)
    fmask = jnp.concatenate([mask, out.mask_BxN], 1)
    logits = llama.forward(CFG, params, full, fmask)["logits"]
    step_logits = np.asarray(logits[:, ids.shape[1] - 1:-1])
    top2 = np.sort(step_logits, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4  # cached decode and full forward agree to ~1e-5 (below)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN)[clear], step_logits.argmax(-1)[clear])
    # Reported log-probs are those of a full forward pass over prompt + response.
    lp = jax.nn.log_softmax(logits[:, ids.shape[1] - 1:-1])
    want_lp = jnp.take_along_axis(lp, out.tokens_BxN[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logp_BxN), np.asarray(want_lp), atol=1e-5)


def test_eos_masks_and_early_exit():
    params = llama.init_params(CFG, jax.random.key(0))
    ids, mask = _prompts()
    scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=12)
    greedy = np.asarray(rollout.jitted_sampler(CFG, scfg, -1, 0)(params, ids, mask, jax.random.key(1), None)
                        .tokens_BxN)
    eos = int(greedy[0, 3])  # row 0 ends at its 4th token; other rows end if/when they emit it
    out = rollout.jitted_sampler(CFG, scfg, eos, 0)(params, ids, mask, jax.random.key(1), None)
    toks, m = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
    for b in range(3):
        hits = np.flatnonzero(greedy[b] == eos)
        n = hits[0] + 1 if hits.size else 12
        assert m[b].sum() == n and np.all(m[b, :n] == 1)
        assert np.all(toks[b, n:] == 0), "rows emit pad after EOS"
        np.testing.assert_array_equal(toks[b, :n], greedy[b, :n])
    lengths = [int(m[b].sum()) for b in range(3)]
    assert int(out.steps) == (max(lengths) if max(lengths) < 12 else 12)
    np.testing.assert_array_equal(np.asarray(rollout.cut_mask(out.mask_BxN, jnp.array([2, 0, 20]))).sum(1),
                                  [min(2, lengths[0]), 0, lengths[2]])


def test_sampling_is_seeded_and_sharded_equals_single_device():
    params = llama.init_params(CFG, jax.random.key(0))
    lcfg = lora_lib.LoraConfig(rank=4)
    adapters = lora_lib.init(CFG, lcfg, jax.random.key(5))
    ids, mask = np.tile(_prompts()[0], (8, 1))[:8], np.tile(_prompts()[1], (8, 1))[:8]
    scfg = sampling.SamplingConfig(temperature=0.9, top_p=0.9, max_new_tokens=8)
    fn = rollout.jitted_sampler(CFG, scfg, -1, 0, lcfg)
    a = fn(params, ids, mask, jax.random.key(3), adapters)
    b = fn(params, ids, mask, jax.random.key(3), adapters)
    c = fn(params, ids, mask, jax.random.key(4), adapters)
    np.testing.assert_array_equal(np.asarray(a.tokens_BxN), np.asarray(b.tokens_BxN))
    assert not np.array_equal(np.asarray(a.tokens_BxN), np.asarray(c.tokens_BxN))
    m = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(2, 2, 2)))
    batch = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec(("data", "fsdp")))
    s = fn(params, jax.device_put(ids, batch), jax.device_put(mask, batch), jax.random.key(3), adapters)
    np.testing.assert_array_equal(np.asarray(s.tokens_BxN), np.asarray(a.tokens_BxN))


def test_grouped_prefill_samples_what_the_ungrouped_sampler_samples():
    """``group = G``: each prompt prefilled once for its G rows. Same tokens and log-probs as prefilling every
    row, on one device and on a (2, 2, 2) mesh, and rows that do not split into groups are refused."""
    params = llama.init_params(CFG, jax.random.key(0))
    lcfg = lora_lib.LoraConfig(rank=4)
    adapters = lora_lib.init(CFG, lcfg, jax.random.key(5))
    ids, mask = (np.repeat(x[:2], 4, axis=0) for x in _prompts())  # 2 prompts x 4 rows, prompt-major
    scfg = sampling.SamplingConfig(temperature=0.9, top_p=0.9, max_new_tokens=8)
    want = rollout.jitted_sampler(CFG, scfg, -1, 0, lcfg)(params, ids, mask, jax.random.key(3), adapters)
    grouped = rollout.jitted_sampler(CFG, scfg, -1, 0, lcfg, group=4)
    m = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(2, 2, 2)))
    batch = jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec(("data", "fsdp")))
    for got in (grouped(params, ids, mask, jax.random.key(3), adapters),
                grouped(params, jax.device_put(ids, batch), jax.device_put(mask, batch), jax.random.key(3), adapters)):
        np.testing.assert_array_equal(np.asarray(got.tokens_BxN), np.asarray(want.tokens_BxN))
        np.testing.assert_array_equal(np.asarray(got.mask_BxN), np.asarray(want.mask_BxN))
        np.testing.assert_allclose(np.asarray(got.logp_BxN), np.asarray(want.logp_BxN), atol=1e-5)
    assert len({tuple(r) for r in np.asarray(want.tokens_BxN)[:4]}) > 1, "a group's rows draw different samples"
    with pytest.raises(ValueError, match="8 rows do not split into groups of 3"):
        rollout.jitted_sampler(CFG, scfg, -1, 0, lcfg, group=3)(params, ids, mask, jax.random.key(3), adapters)
