"""Parity of the Llama-family models with transformers (PyTorch) on tiny random safetensors checkpoints.

fp32 everywhere; logits compared at real (non-pad) positions, max abs err <= 1e-4.
"""
import numpy as np
import pytest
import torch

import hf_fixtures as F
from rre_jax import models
from rre_jax.models import llama

TOL = 1e-4


def _batch(seed=0, B=3, T=12, vocab=96, left_pad=(0, 3, 7)):
    """Left-padded batch (pad id 0; real tokens never 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    for b, n in enumerate(left_pad[:B]):
        mask[b, :n] = 0
        ids[b, :n] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize("variant", sorted(F.VARIANTS))
def test_causal_lm_logits_match_transformers(variant, tmp_path):
    ref = F.causal_lm(variant)
    loaded = models.from_pretrained(F.save(ref, tmp_path))
    assert loaded.kind == "causal_lm"
    ids, mask = _batch()
    ours = np.asarray(models.causal_lm_logits(loaded, loaded.params, ids, mask))
    theirs = _hf_logits(ref, ids, mask)
    real = mask.astype(bool)
    err = np.abs(ours[real] - theirs[real]).max()
    assert err <= TOL, f"{variant}: max abs err {err}"
    assert np.abs(theirs[real]).max() > 0.5  # the comparison is not between two near-zero tensors


def test_sharded_index_checkpoint(tmp_path):
    ref = F.causal_lm("llama_gqa", seed=3)
    path = F.save(ref, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    loaded = models.from_pretrained(path)
    ids, mask = _batch(seed=1)
    err = np.abs(np.asarray(models.causal_lm_logits(loaded, loaded.params, ids, mask))
                 - _hf_logits(ref, ids, mask))[mask.astype(bool)].max()
    assert err <= TOL


def test_seq_cls_scores_right_padded(tmp_path):
    ref = F.seq_cls(num_labels=2)
    loaded = models.from_pretrained(F.save(ref, tmp_path))
    assert loaded.kind == "seq_cls" and loaded.config.num_labels == 2
    ids, mask = _batch(seed=2, B=4, T=10, left_pad=(0, 0, 0, 0))
    for b, n in enumerate((10, 6, 3, 9)):  # right padding with the pad id
        mask[b, n:] = 0
        ids[b, n:] = 0
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(models.sequence_scores(loaded, loaded.params, ids, mask))
    assert ours.shape == (4, 2)
    assert np.abs(ours - theirs).max() <= TOL


def test_starling_layout_scores(tmp_path):
    ref = F.starling()
    loaded = models.from_pretrained(F.save(ref, tmp_path))
    assert loaded.kind == "starling" and loaded.config.num_labels == 1
    ids, mask = _batch(seed=4, B=4, T=11, left_pad=(0, 0, 0, 0))
    for b, n in enumerate((11, 7, 2, 9)):
        mask[b, n:] = 0
        ids[b, n:] = 0
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    # transformers 5.23 ties hidden_states[-1] to the final-norm output, which the card's class reads.
    assert torch.equal(out["hidden_states"][-1], out["last_hidden_state"])
    ours = np.asarray(models.sequence_scores(loaded, loaded.params, ids, mask))[:, 0]
    assert np.abs(ours - out["scores"].numpy()).max() <= TOL


def test_value_head_shares_trunk():
    cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                            num_attention_heads=2)
    import jax
    params = llama.init_params(cfg, jax.random.key(0), value_head=True)
    ids, mask = _batch(B=2, T=5, vocab=32, left_pad=(0, 2))
    out = llama.forward(cfg, params, ids, mask, value_head=True)
    base = {k: v for k, v in params.items() if k not in ("value_head", "value_bias")}
    np.testing.assert_array_equal(out["logits"], llama.forward(cfg, base, ids, mask)["logits"])
    h = np.asarray(out["hidden"])
    want = h @ np.asarray(params["value_head"])[:, 0] + np.asarray(params["value_bias"])[0]
    np.testing.assert_allclose(out["values"], want, atol=1e-5)


def test_blocked_attention_is_the_unblocked_one():
    """Calls of two and more ``QUERY_BLOCK``s of queries run block by block (each block rematerialised for its
    backward pass); every query still attends over all keys in one softmax, so values and gradients are those of
    the one-shot computation up to float32 rounding: GEMMs of another size sum in another order, a few ulps
    (measured: 1e-7 relative to the largest value, 6e-7 for the gradients)."""
    import jax
    import jax.numpy as jnp
    B, K, G, T, E = 2, 2, 2, 2 * llama.QUERY_BLOCK, 16
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, K, G, T, E))
    k, v = (jax.random.normal(r, (B, K, T, E)) for r in keys[1:])
    real_BxT = jnp.arange(T)[None] >= jnp.array([0, 37])[:, None]  # one row left-padded
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & real_BxT[:, None, :]

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, allowed, jnp.float32) * jnp.cos(v.sum())).sum()
    for blocked, whole in zip((llama.attend(q, k, v, allowed, jnp.float32),
                               *jax.grad(loss(llama.attend), argnums=(0, 1, 2))(q, k, v)),
                              (llama._attend(q, k, v, allowed, jnp.float32),
                               *jax.grad(loss(llama._attend), argnums=(0, 1, 2))(q, k, v))):
        np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-5 * float(jnp.abs(whole).max()))
    jaxpr = str(jax.make_jaxpr(lambda q: llama.attend(q, k, v, allowed, jnp.float32))(q))
    assert "scan" in jaxpr, "two blocks' worth of queries run in a loop over blocks"
