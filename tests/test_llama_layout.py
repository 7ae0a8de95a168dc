"""The per-layer weight layout (``load_pretrained(..., layer_layout='per_layer')``): loaded straight from an
HF checkpoint, one array per layer weight, it computes what transformers computes (logits <= 1e-4, greedy
tokens equal to ``generate``) and what the default stacked layout computes (within 1e-6 of the logits'
scale: only XLA's fusion of the bias adds differs), and it round-trips to the checkpoint bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import hf_fixtures as F
from rre_jax import models, rollout
from rre_jax.models import hf, llama, lora as lora_lib


def _close_to_stacked(ours, stacked, what):
    ours, stacked = np.asarray(ours), np.asarray(stacked)
    err = np.abs(ours - stacked).max()
    assert err <= 1e-6 * max(1.0, np.abs(stacked).max()), f"{what}: per-layer vs stacked max abs err {err}"


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_bias", "tied", "qwen2"])
def test_per_layer_load_matches_transformers_and_stacked(variant, tmp_path):
    ref = F.causal_lm(variant, seed=2)
    path = F.save(ref, tmp_path)
    stacked = models.from_pretrained(path)
    per = models.from_pretrained(path, layer_layout="per_layer")
    cfg, params = per.config, per.params
    L = cfg.num_hidden_layers
    assert per.kind == "causal_lm" and llama.layer_layout(params) == "per_layer"
    assert sorted(k for k in params if k.startswith("layers")) == [f"layers_{i}" for i in range(L)]
    assert params["layers_1"]["q_proj"]["kernel"].shape == (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim)

    ids, mask = F.left_padded(3, 4, 9, cfg.vocab_size, (0, 1, 4, 6))
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        hf_logits = ref(input_ids=t_ids, attention_mask=t_mask, position_ids=torch.tensor(pos)).logits.numpy()
        hf_tokens = ref.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    logits = np.asarray(models.causal_lm_logits(per, params, ids, mask))
    real = mask.astype(bool)
    assert np.abs(logits - hf_logits)[real].max() <= 1e-4
    _close_to_stacked(logits[real], np.asarray(models.causal_lm_logits(stacked, stacked.params, ids, mask))[real],
                      "forward")

    tokens = np.asarray(rollout.greedy(cfg, params, ids, mask, 24))
    np.testing.assert_array_equal(tokens, hf_tokens)
    np.testing.assert_array_equal(tokens, np.asarray(rollout.greedy(cfg, stacked.params, ids, mask, 24)))
    assert len(np.unique(hf_tokens)) > 6

    lp, cp = llama.prefill(cfg, params, ids[:, :5], mask[:, :5], 12)
    ls, cs = llama.prefill(cfg, stacked.params, ids[:, :5], mask[:, :5], 12)
    _close_to_stacked(lp, ls, "prefill")
    for t in range(5, 9):
        lp, cp = llama.decode_step(cfg, params, jnp.asarray(ids[:, t]), cp)
        ls, cs = llama.decode_step(cfg, stacked.params, jnp.asarray(ids[:, t]), cs)
        _close_to_stacked(lp, ls, f"decode step {t}")


def test_per_layer_params_round_trip_and_export(tmp_path):
    ref = F.causal_lm("llama_bias", seed=4)
    path = F.save(ref, tmp_path / "in")
    per = models.from_pretrained(path, layer_layout="per_layer")
    theirs = load_file(f"{path}/model.safetensors")
    ours = hf.export_tensors(per.params, llama.weight_map(per.config, "causal_lm", "per_layer"))
    assert sorted(ours) == sorted(theirs)
    for name, x in theirs.items():
        np.testing.assert_array_equal(ours[name], x, err_msg=name)
    llama.export_pretrained(str(tmp_path / "out"), per.config, per.params)
    again = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, x in theirs.items():
        np.testing.assert_array_equal(again[name], x, err_msg=name)


def test_stacked_lora_applies_to_per_layer_params(tmp_path):
    path = F.save(F.causal_lm("llama_gqa", seed=5), tmp_path)
    stacked = models.from_pretrained(path)
    per = models.from_pretrained(path, layer_layout="per_layer")
    cfg = per.config
    lcfg = lora_lib.LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"))
    adapters = lora_lib.init(cfg, lcfg, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    ids, mask = F.left_padded(6, 3, 8, cfg.vocab_size, (0, 2, 5))
    want = llama.forward(cfg, stacked.params, ids, mask, lora=adapters, lora_cfg=lcfg)["logits"]
    got = llama.forward(cfg, per.params, ids, mask, lora=adapters, lora_cfg=lcfg)["logits"]
    plain = llama.forward(cfg, per.params, ids, mask)["logits"]
    real = mask.astype(bool)
    assert np.abs(np.asarray(got) - np.asarray(plain))[real].max() > 1e-3  # the adapters do something
    _close_to_stacked(np.asarray(got)[real], np.asarray(want)[real], "forward with LoRA")
    np.testing.assert_array_equal(
        rollout.greedy(cfg, per.params, ids, mask, 8, lora=adapters, lora_cfg=lcfg),
        rollout.greedy(cfg, stacked.params, ids, mask, 8, lora=adapters, lora_cfg=lcfg))
    with pytest.raises(ValueError, match="load the model with layer_layout='stacked'"):
        llama.export_pretrained(str(tmp_path / "x"), cfg, per.params, lora=adapters, lora_cfg=lcfg)


def test_bad_layout_is_rejected(tmp_path):
    path = F.save(F.causal_lm("llama_gqa"), tmp_path)
    with pytest.raises(ValueError, match=r"layer_layout must be one of \('stacked', 'per_layer'\), got 'flat'"):
        models.from_pretrained(path, layer_layout="flat")
    with pytest.raises(ValueError, match="neither 'layers' nor 'layers_0'"):
        llama.layer_layout({"embedding": 0})
