"""KV cache: prefill + one-token decode steps equal full recomputation; greedy decoding equals
transformers' greedy ``generate`` token for token on left-padded batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_fixtures as F
from rre_jax import models, rollout
from rre_jax.models import llama


@pytest.mark.parametrize("write_cache_last", [False, True], ids=["writes_first", "writes_last"])
@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2"])
def test_cached_steps_equal_full_recompute(variant, write_cache_last, tmp_path):
    """Both orders of a step's cache writes (``llama.Llama.write_cache_last``: each layer writes its keys before it
    attends, as on XLA:CPU, or every layer attends over the cache and its own keys and the writes come last, as on
    accelerators) give the full recomputation's logits."""
    loaded = models.from_pretrained(F.save(F.causal_lm(variant), tmp_path))
    cfg, params = loaded.config, loaded.params
    ids, mask = F.left_padded(0, 3, 14, cfg.vocab_size, (0, 2, 5))
    T0 = 6  # prompt part: rows 1, 2 are left-padded inside it
    full = np.asarray(llama.forward(cfg, params, ids, mask)["logits"])
    logits, cache = llama.prefill(cfg, params, ids[:, :T0], mask[:, :T0], 16)
    np.testing.assert_allclose(logits, full[:, T0 - 1], atol=1e-5, rtol=0)
    for t in range(T0, 14):
        logits, cache = llama.decode_step(cfg, params, jnp.asarray(ids[:, t]), cache,
                                          write_cache_last=write_cache_last)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0, err_msg=f"step {t}")
    assert int(cache["index"]) == 14 and cache["mask"].shape == (3, 16)
    np.testing.assert_array_equal(cache["pos"], mask.sum(-1))


@pytest.mark.parametrize("variant", ["llama_gqa", "llama3_rope", "tied", "mistral", "qwen2"])
def test_greedy_matches_transformers_generate(variant, tmp_path):
    ref = F.causal_lm(variant, seed=1)
    loaded = models.from_pretrained(F.save(ref, tmp_path))
    ids, mask = F.left_padded(5, 4, 9, loaded.config.vocab_size, (0, 1, 4, 6))
    with torch.no_grad():
        theirs = ref.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=32,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    ours = np.asarray(rollout.greedy(loaded.config, loaded.params, ids, mask, 32))
    assert theirs.shape == (4, 32)
    np.testing.assert_array_equal(ours, theirs)
    assert len(np.unique(theirs)) > 8  # not a degenerate constant continuation


def test_greedy_stops_rows_at_eos():
    cfg = llama.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                            num_attention_heads=2)
    params = llama.init_params(cfg, jax.random.key(0))
    ids, mask = F.left_padded(1, 2, 4, 16, (0, 2))
    free = np.asarray(rollout.greedy(cfg, params, ids, mask, 12))
    eos = int(free[0, 2])
    out = np.asarray(rollout.greedy(cfg, params, ids, mask, 12, eos_id=eos, pad_id=0))
    for row_free, row in zip(free, out):
        hit = np.flatnonzero(row_free == eos)
        if hit.size:
            k = hit[0]
            np.testing.assert_array_equal(row[:k + 1], row_free[:k + 1])
            assert (row[k + 1:] == 0).all()
        else:
            np.testing.assert_array_equal(row, row_free)
