"""The trained network: a Llama policy with a value head, in LoRA or full fine-tuning mode.

Shapes: ``B`` rows, ``T`` prompt bucket (left padded), ``N`` response length, ``S = T + N``, ``V`` vocab.

* ``lora`` (the paper's setting): trainable = LoRA adapters + a value head on the shared trunk; the frozen
  base weights are a jit argument (``frozen``); the reference policy is the same network with adapters off.
* ``full``: trainable = every policy weight and a value head; the reference is the frozen initial policy. The
  value head sits on a separate critic (``critic='separate'``: its own copy of the trunk, the default) or on the
  policy's own trunk (``critic='shared'``: one set of trunk weights trained by both losses, as trl 0.7.4's
  ``AutoModelForCausalLMWithValueHead`` does; half the parameters, optimizer state and update FLOPs).

The LM head is applied only at the ``N`` positions that predict response tokens (``hidden[:, T-1:-1]``), never
to the prompt: a third less head work at benchmark lengths and no ``B x S x V`` logits. The experience pass
(``experience``) runs over groups of rows so only one group's ``G x N x V`` logits are alive at once.

A response token ``t`` is predicted at sequence position ``T - 1 + t``: log-probs, entropies and values are
read there, as trl 0.7.4's ``batched_forward_pass`` does (``logits[:, :-1]`` against ``input_ids[:, 1:]``,
``values[:, :-1]``). RoPE positions come from the attention mask everywhere (sampling and scoring agree).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rre_jax import errors
from rre_jax.models import llama, lora as lora_lib

MODES = ("lora", "full")
CRITICS = ("separate", "shared")


def check_critic(critic: str) -> str:
    """``critic`` if it names a critic layout, else an error naming ``config.model.critic`` and the choices."""
    return errors.one_of("config.model.critic", critic, CRITICS, "'separate': the critic has its own trunk copy; "
                         "'shared': the value head sits on the policy trunk, as in trl 0.7.4")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """Static description of the trained network (a hashable jit argument)."""

    cfg: llama.LlamaConfig
    mode: str = "lora"
    lora_cfg: lora_lib.LoraConfig | None = None
    critic: str = "separate"  # full mode only; LoRA's value head always shares the (adapted) trunk
    remat: str = "none"  # llama.REMAT: what the update's backward pass keeps of each layer
    mesh: Any = None  # with ``rules``: sharding constraints on the activations (the training path sets both)
    rules: tuple = ()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"model.train_mode={self.mode!r}; choose one of {MODES}")
        check_critic(self.critic)
        llama.check_remat(self.remat)
        if self.mode == "lora" and self.lora_cfg is None:
            raise ValueError("model.train_mode='lora' needs a LoRA config (config.model.lora)")


VALUE_HEAD_INITS = ("trl", "normal")


def init_value_head(cfg: llama.LlamaConfig, rng, init: str = "trl"):
    """A fresh scalar value head on the trunk's final hidden state (``Dense(1)`` with bias, D = hidden size).

    ``trl`` (the default): what trl 0.7.4's ``ValueHead`` starts from, torch ``nn.Linear``'s own init (trl's
    ``v_head_init_strategy=None`` leaves it alone): weight and bias each uniform in [-1/sqrt(D), 1/sqrt(D)).
    ``normal``: weight N(0, 0.02), zero bias (rre_jax's init before it followed trl; a smaller first value
    estimate, so the first value losses differ).
    """
    if init not in VALUE_HEAD_INITS:
        raise ValueError(f"value head init {init!r}; choose one of {VALUE_HEAD_INITS}")
    k_w, k_b = jax.random.split(rng)
    D = cfg.hidden_size
    if init == "normal":
        return {"value_head": 0.02 * jax.random.normal(k_w, (D, 1), cfg.param_dtype),
                "value_bias": jnp.zeros((1,), cfg.param_dtype)}
    bound = 1.0 / math.sqrt(D)
    return {"value_head": jax.random.uniform(k_w, (D, 1), cfg.param_dtype, -bound, bound),
            "value_bias": jax.random.uniform(k_b, (1,), cfg.param_dtype, -bound, bound)}


def init_trainable(spec: PolicySpec, base, rng):
    """Trainable pytree: ``{'lora', 'value'}`` (lora), ``{'policy', 'critic'}`` (full, separate critic) or
    ``{'policy', 'value'}`` (full, shared critic)."""
    k_lora, k_value = jax.random.split(rng)
    value = init_value_head(spec.cfg, k_value)
    if spec.mode == "lora":
        return {"lora": lora_lib.init(spec.cfg, spec.lora_cfg, k_lora, spec.cfg.param_dtype), "value": value}
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731  (fresh buffers: base stays the reference)
    if spec.critic == "shared":
        return {"policy": copy(base), "value": value}
    return {"policy": copy(base), "critic": {**copy(base), **value}}


def _token_stats(spec: PolicySpec, params, hidden_BxNxD, tokens_BxN):
    """(log-prob of each token, entropy of each distribution), float32, from the final hidden states.

    One pass over the logits: ``logz`` once, ``logp = z[token] - logz``, ``H = logz - sum(softmax(z) * z)``.
    """
    w = params["embedding"].T if spec.cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("bnd,dv->bnv", hidden_BxNxD, w.astype(spec.cfg.dtype), preferred_element_type=jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, tokens_BxN[..., None], -1)[..., 0] - logz
    entropy = logz - jnp.sum(jnp.exp(logits - logz[..., None]) * logits, axis=-1)
    return logp, entropy


def _run(spec, params, ids_BxS, mask_BxS, *, lora=None, value_head=False, rng=None):
    """Llama forward; ``rng`` turns on LoRA dropout (``config.model.lora.dropout``). Callers read ``hidden``
    (and ``values``); the full-sequence logits the module also returns are dead code that XLA removes."""
    con = {} if spec.mesh is None else {"mesh": spec.mesh, "rules": spec.rules}
    return llama.forward(spec.cfg, params, ids_BxS, mask_BxS, value_head=value_head, lora=lora,
                         lora_cfg=spec.lora_cfg if lora is not None else None, rng=rng, remat=spec.remat, **con)


def policy_outputs(spec: PolicySpec, trainable, frozen, ids_BxS, mask_BxS, T: int, rng=None):
    """``(logp_BxN, values_BxN, entropy_BxN)`` of the current policy and value head on full sequences."""
    tokens_BxN = ids_BxS[:, T:]
    if spec.mode == "lora":
        params = {**frozen, **trainable["value"]}
        rng = rng if spec.lora_cfg.dropout > 0 else None
        out = _run(spec, params, ids_BxS, mask_BxS, lora=trainable["lora"], value_head=True, rng=rng)
        values = out["values"]
    elif spec.critic == "shared":
        params = {**trainable["policy"], **trainable["value"]}
        out = _run(spec, params, ids_BxS, mask_BxS, value_head=True)
        values = out["values"]
    else:
        params = trainable["policy"]
        out = _run(spec, params, ids_BxS, mask_BxS)
        values = _run(spec, trainable["critic"], ids_BxS, mask_BxS, value_head=True)["values"]
    logp, entropy = _token_stats(spec, params, out["hidden"][:, T - 1:-1], tokens_BxN)
    values = values[:, T - 1:-1].astype(jnp.float32)
    return logp, values, entropy


def reference_logp(spec: PolicySpec, frozen, ids_BxS, mask_BxS, T: int):
    """Log-probs of the response tokens under the reference policy (adapters off / initial weights)."""
    out = _run(spec, frozen, ids_BxS, mask_BxS)
    return _token_stats(spec, frozen, out["hidden"][:, T - 1:-1], ids_BxS[:, T:])[0]


class Experience(NamedTuple):
    """The frozen-per-batch forward passes of a rollout batch (float32 ``[B, N]`` each): the sampling policy's
    log-probs, the critic's values and the reference's log-probs; None where the algorithm does not use them."""

    logp_BxN: Any
    values_BxN: Any = None
    ref_logp_BxN: Any = None


def experience(spec: PolicySpec, trainable, frozen, ids_BxS, mask_BxS, T: int, rows: int | None = None, *,
               values: bool = True, reference: bool = True) -> Experience:
    """The `Experience` of a rollout batch: log-probs always, values with ``values``, the reference's log-probs
    with ``reference`` (a pass not asked for is never computed: XLA drops unread values, and no reference
    forward runs at all).

    ``rows`` (dividing ``B``) runs the passes over ``B / rows`` groups of rows in a ``lax.map``, so only one
    group's logits and activations are alive at once (rows never interact: results equal the one-shot pass).
    Group ``j`` holds rows ``j, j + B/rows, ...``, so a batch sharded over devices in contiguous blocks stays
    evenly sharded in every group when ``rows`` is a multiple of the device count.
    """
    def one(xs):
        ids, mask = xs
        logp, v, _ = policy_outputs(spec, trainable, frozen, ids, mask, T)
        out = (logp,) + ((v,) if values else ())
        return out + ((reference_logp(spec, frozen, ids, mask, T),) if reference else ())

    out = iter(_over_row_groups(one, ids_BxS, mask_BxS, rows))
    logp = next(out)
    return Experience(logp, next(out) if values else None, next(out) if reference else None)


def _over_row_groups(one, ids_BxS, mask_BxS, rows: int | None):
    """``one((ids, mask))`` over ``B / rows`` groups of rows in a ``lax.map`` (group ``j``: rows ``j, j + B/rows,
    ...``); the whole batch at once when ``rows`` is None or covers it."""
    B = ids_BxS.shape[0]
    if rows is None or rows >= B:
        return one((ids_BxS, mask_BxS))
    if B % rows:
        raise ValueError(f"experience: rows={rows} must divide the batch of {B} rows")
    groups = B // rows
    split = lambda x: x.reshape(rows, groups, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731  GxRx...
    merge = lambda y: y.swapaxes(0, 1).reshape(B, *y.shape[2:])  # noqa: E731
    return tuple(merge(y) for y in jax.lax.map(one, (split(ids_BxS), split(mask_BxS))))


def sampling_params(spec: PolicySpec, trainable, frozen):
    """``(params, lora)`` the sampler decodes with."""
    if spec.mode == "lora":
        return frozen, trainable["lora"]
    return trainable["policy"], None


def export_params(spec: PolicySpec, trainable, frozen):
    """``(params, lora)`` of the policy to export (LoRA merged by the exporter)."""
    return sampling_params(spec, trainable, frozen)
