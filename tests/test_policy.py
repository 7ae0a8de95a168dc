"""rre_jax.policy against transformers + trl 0.7.4 semantics (tests/trl_reference.py) on a tiny Llama.

* ``policy_outputs`` / ``reference_logp`` (LM head applied only at the response positions) equal the response
  log-probs, entropies and values that trl's ``batched_forward_pass`` reads from the full HF logits, in LoRA
  mode and in full mode with either critic.
* ``experience`` over groups of rows (on one device and sharded over 8) equals the one-shot pass.
* A full-mode PPO update with the shared-trunk critic equals trl's step loop (torch autograd + Adam) on the
  same HF model with a value head on its last hidden state: every weight, the value head and the stats.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P

import hf_fixtures as F
import trl_reference as ref
from rre_jax import advantages as adv
from rre_jax import mesh as mesh_lib
from rre_jax import policy, ppo
from rre_jax.models import llama, lora as lora_lib

torch.set_num_threads(1)
TOL = dict(rtol=1e-5, atol=1e-5)
B, T, N = 4, 5, 6  # rows, prompt bucket, response tokens
LCFG = lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0)


@functools.lru_cache(maxsize=None)
def _model(tmp_root):
    """(HF torch model, LlamaConfig, JAX params) of the same tiny random checkpoint (no padding-free ids)."""
    hf = F.causal_lm("llama_gqa", seed=0)
    path = f"{tmp_root}/tiny_policy"
    F.save(hf, path)
    _, cfg, params = llama.load_pretrained(path)
    return hf, cfg, params


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(str(tmp_path_factory.mktemp("policy")))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 96, (B, T + N)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left-padded prompts
    mask[3, :1] = 0
    mask[2, -2:] = 0  # a response cut short
    return ids, mask


def _value_head(seed=1):
    rng = np.random.default_rng(seed)
    return {"value_head": rng.normal(0, 0.3, (64, 1)).astype(np.float32), "value_bias": np.full((1,), 0.1, np.float32)}


def _torch_outputs(hf, value, ids, mask):
    """trl's batched_forward_pass on the HF model: response logits, log-probs and values (positions from the
    attention mask, as rre_jax uses for sampling and scoring)."""
    ids_t, mask_t = torch.as_tensor(ids).long(), torch.as_tensor(mask).long()
    pos = torch.clamp(mask_t.cumsum(1) - 1, min=0)
    out = hf(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, output_hidden_states=True)
    logits = out.logits[:, T - 1:-1]
    logp = torch.gather(torch.log_softmax(logits, -1), 2, ids_t[:, T:, None]).squeeze(-1)
    h = out.hidden_states[-1][:, T - 1:-1]
    values = (h @ torch.as_tensor(value["value_head"]) + torch.as_tensor(value["value_bias"])).squeeze(-1)
    return logits, logp, values


def _nonzero_lora(cfg):
    lora = lora_lib.init(cfg, LCFG, jax.random.key(3), jnp.float32)
    keys = iter(jax.random.split(jax.random.key(4), 16))
    return {"layers": {t: {"a": a["a"], "b": 0.3 * jax.random.normal(next(keys), a["b"].shape)}
                       for t, a in lora["layers"].items()}}


@pytest.mark.parametrize("mode,critic", [("lora", "separate"), ("full", "separate"), ("full", "shared")])
def test_policy_outputs_match_transformers(model, mode, critic, tmp_path):
    hf, cfg, params = model
    ids, mask = _batch()
    value = {k: jnp.asarray(v) for k, v in _value_head().items()}
    spec = policy.PolicySpec(cfg, mode, LCFG, critic)
    if mode == "lora":  # the torch side: the HF model with the adapters merged (llama.export_pretrained)
        trainable = {"lora": _nonzero_lora(cfg), "value": value}
        llama.export_pretrained(str(tmp_path), cfg, params, lora=trainable["lora"], lora_cfg=LCFG)
        want_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    elif critic == "shared":
        trainable, want_hf = {"policy": params, "value": value}, hf
    else:
        trainable, want_hf = {"policy": params, "critic": {**params, **value}}, hf
    logp, values, entropy = jax.jit(policy.policy_outputs, static_argnums=(0, 5))(
        spec, trainable, params, ids, mask, T)
    with torch.no_grad():
        logits, want_logp, want_values = _torch_outputs(want_hf, _value_head(), ids, mask)
        want_entropy = ref.entropy_from_logits(logits.numpy())
        ref_logits, ref_logp, _ = _torch_outputs(hf, _value_head(), ids, mask)
    np.testing.assert_allclose(logp, want_logp.numpy(), **TOL)
    np.testing.assert_allclose(entropy, want_entropy, **TOL)
    np.testing.assert_allclose(values, want_values.numpy(), **TOL)
    got_ref = jax.jit(policy.reference_logp, static_argnums=(0, 4))(spec, params, ids, mask, T)
    np.testing.assert_allclose(got_ref, ref_logp.numpy(), **TOL)
    if mode == "lora":
        assert np.abs(np.asarray(logp) - ref_logp.numpy()).max() > 1e-3  # the adapters act


def test_experience_over_row_groups_equals_one_pass(model):
    _, cfg, params = model
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 96, (16, T + N)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :2] = 0
    spec = policy.PolicySpec(cfg, "lora", LCFG)
    trainable = {"lora": _nonzero_lora(cfg), "value": _value_head()}
    run = jax.jit(policy.experience, static_argnums=(0, 5, 6))
    want = run(spec, trainable, params, ids, mask, T, None)
    for rows in (2, 8):
        for got, w in zip(run(spec, trainable, params, ids, mask, T, rows), want):
            np.testing.assert_allclose(got, w, **TOL)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(4, 2, 1)))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))  # noqa: E731
    rep = lambda t: jax.device_put(t, NamedSharding(mesh, P()))  # noqa: E731
    for got, w in zip(run(spec, rep(trainable), rep(params), shard(ids), shard(mask), T, 8), want):
        np.testing.assert_allclose(got, w, **TOL)
    with pytest.raises(ValueError, match="rows=3 must divide"):
        policy.experience(spec, trainable, params, ids, mask, T, 3)


def test_bad_remat_is_named():
    with pytest.raises(ValueError, match=r"model.remat='some'.*'none', 'dots', 'full'"):
        policy.PolicySpec(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=1), "lora", LCFG, remat="some")


def test_bad_critic_is_named():
    with pytest.raises(ValueError, match="model.critic='twin'"):
        policy.PolicySpec(llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=1), "full", critic="twin")


def test_value_head_starts_as_trl_does():
    """trl 0.7.4's ValueHead keeps torch nn.Linear's default init: weight and bias uniform in +-1/sqrt(D). Ours
    (D = 4096: 4096 weights; 300 seeds: 300 biases) against torch's own draws of the same layer: inside the
    bound, and the same distribution by a two-sample Kolmogorov-Smirnov test (p > 1e-3: a wrong law -- the old
    N(0, 0.02), or a 1/D bound -- gives p < 1e-30 at these sizes). ``init='normal'`` keeps N(0, 0.02), bias 0."""
    from scipy import stats
    D = 4096
    cfg = llama.LlamaConfig(vocab_size=8, hidden_size=D, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=1)
    heads = jax.vmap(lambda k: policy.init_value_head(cfg, k))(jax.random.split(jax.random.key(0), 300))
    w, bias = np.asarray(heads["value_head"][0, :, 0]), np.asarray(heads["value_bias"][:, 0])
    torch.manual_seed(0)
    linears = [torch.nn.Linear(D, 1) for _ in range(300)]
    w_t, bias_t = linears[0].weight.detach().numpy()[0], np.array([float(lin.bias) for lin in linears])
    bound = 1 / np.sqrt(D)
    assert np.abs(w).max() <= bound and np.abs(bias).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert stats.ks_2samp(w, w_t).pvalue > 1e-3 and stats.ks_2samp(bias, bias_t).pvalue > 1e-3
    assert stats.ks_2samp(0.02 * np.random.default_rng(0).normal(size=D), w_t).pvalue < 1e-30  # the test can fail
    old = policy.init_value_head(cfg, jax.random.key(0), init="normal")
    assert float(old["value_bias"][0]) == 0.0 and abs(float(np.std(old["value_head"])) - 0.02) < 0.001
    with pytest.raises(ValueError, match="value head init 'zeros'"):
        policy.init_value_head(cfg, jax.random.key(0), init="zeros")


def _hf_to_jax(hf, tmp_path):
    F.save(hf, str(tmp_path))
    return llama.load_pretrained(str(tmp_path))[2]


@pytest.mark.parametrize("remat", llama.REMAT)
def test_shared_critic_update_matches_trl_step_loop(model, tmp_path, remat):
    """Full fine-tuning, value head on the policy trunk: one rre_jax update == trl's epochs over the same
    minibatches with torch autograd and Adam on the HF model + a Linear value head, whatever the backward
    keeps of each layer (``remat``: recomputed activations give the same gradients)."""
    hf, cfg, params = model
    pcfg = ppo.PPOConfig(batch_size=B, mini_batch_size=1, gradient_accumulation_steps=2, ppo_epochs=2,
                         learning_rate=3e-3, max_grad_norm=None)
    spec = policy.PolicySpec(cfg, "full", critic="shared", remat=remat)
    ids, mask = _batch(1)
    trainable = policy.init_trainable(spec, params, jax.random.key(0))
    trainable["value"] = {k: jnp.asarray(v) for k, v in _value_head().items()}
    logp, values, ref_logp = jax.jit(policy.experience, static_argnums=(0, 5, 6))(
        spec, trainable, params, ids, mask, T, None)
    score = np.array([1.0, -0.5, 2.0, 0.3], np.float32)
    resp_mask = mask[:, T:].astype(np.float32)
    batch, _, _ = ppo.prepare_batch(logp, ref_logp + 0.05, values, score, resp_mask, adv.init_moments(),
                                    adv.init_kl(0.2), pcfg)
    batch = {**jax.tree.map(np.array, batch), "ids": ids, "attn": mask}

    def forward(tr, mb, rng):
        return policy.policy_outputs(spec, tr, None, mb["ids"], mb["attn"], T)
    opt = ppo.make_optimizer(pcfg)
    rng = jax.random.key(7)
    new, _, stats = jax.jit(ppo.make_update_step(forward, opt, pcfg))(trainable, opt.init(trainable), batch, rng)

    torch_hf = F.causal_lm("llama_gqa", seed=0)
    vh = {k: torch.tensor(v, requires_grad=True) for k, v in _value_head().items()}
    tparams = {**dict(torch_hf.named_parameters()), **vh}

    def torch_forward(_, rows):
        logits, logp, values = _torch_outputs(torch_hf, vh, ids[rows.numpy()], mask[rows.numpy()])
        return logp, logits, values
    perms = np.asarray(ppo.minibatch_indices(jax.random.split(rng)[0], pcfg)).reshape(pcfg.ppo_epochs, -1)
    want = ref.mean_stats(ref.step_update(torch_forward, tparams, batch, perms, pcfg))
    want_policy = _hf_to_jax(torch_hf, tmp_path)
    moved = 0.0
    for (path, got), w, p0 in zip(jax.tree_util.tree_leaves_with_path(new["policy"]), jax.tree.leaves(want_policy),
                                  jax.tree.leaves(params)):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
        moved = max(moved, float(np.abs(np.asarray(got) - np.asarray(p0)).max()))
    assert moved > 1e-3  # the trunk trained (by both losses)
    for k in ("value_head", "value_bias"):
        np.testing.assert_allclose(new["value"][k], vh[k].detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
    for k, v in want.items():
        np.testing.assert_allclose(stats[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
