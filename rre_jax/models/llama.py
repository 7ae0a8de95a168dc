"""Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, Yi) in flax.linen, with LM, value and score heads.

One trunk -- RMSNorm, rotary embeddings (default / linear / llama3 scaling), grouped-query attention,
SwiGLU MLP, optional q/k/v bias (Qwen2) -- is applied as a pure function of a parameter pytree. The
layers are an ``nn.scan`` over one decoder layer: parameters are stacked along a leading ``layers``
axis (fast compiles for 7B/34B; ``hf.StackedWeightSpec`` streams them from the per-layer HF tensors).
The stacked layout is the model's own. The second *layer layout*, ``per_layer`` (``layers_0 .. layers_{L-1}``,
one array per layer and weight), exists for one reason: the decode loop (``rollout.sample``) wants it, because
a stacked weight sliced inside a ``while_loop`` is copied at every step. It is the same module applied without
the scan (``Llama(scan=False)``); ``unstack_layers`` is the adapter between the two (once per decode call), and
``load_pretrained(..., layer_layout='per_layer')`` loads it directly for generation-only use, so no second copy
of a 7B model's layers ever exists. ``layer_layout(params)`` tells which one a tree holds.

Every parameter carries logical axis names (``rre_jax.mesh.DEFAULT_RULES``) and the main activations
get sharding constraints when the module is given a mesh. Numerics follow transformers: RMSNorm in
fp32 then cast, ``rotate_half`` RoPE with inverse frequencies computed exactly as its ``rope_init_fn``s,
masked attention logits set to ``finfo(float32).min``, softmax in fp32.

KV cache: an explicit pytree ``{k, v: L-tuples of (B, K, S, E), mask: (B, S), index: (), pos: (B,)}`` -- slots
``[0, index)`` are written, ``mask`` says which of them are real tokens (left padding stays masked),
``pos`` is each row's next RoPE position. ``prefill`` fills it from a (left-padded) prompt batch and
``decode_step`` appends one token; both are usable inside ``lax.while_loop`` (``rollout.sample``, the one
decode loop).

Array-name letters: B batch, T tokens of this call, S cache slots, D hidden size, F MLP size,
H query heads, K kv heads, G = H / K, E head dim, V vocab, C score classes, L layers.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rre_jax import mesh as mesh_lib
from rre_jax.models import hf, lora as lora_lib
from rre_jax.models.hf import StackedWeightSpec, WeightSpec

MODEL_TYPES = ("llama", "mistral", "qwen2")
LAYER_LAYOUTS = ("stacked", "per_layer")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_ROPE_TYPES = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


# ----------------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder plus compute/param dtypes. Hashable (a static jit arg).

    ``attention_bias`` adds biases to q/k/v (Qwen2, or Llama with ``attention_bias``), ``o_proj_bias``
    to the output projection (Llama ``attention_bias`` only). ``rope_scaling`` is ``None`` or the HF
    rope dict as a sorted tuple of items (``rope_type`` in default / linear / llama3). ``sliding_window``
    (Mistral) is not implemented as a mask: sequences longer than it are rejected with an error.
    ``num_labels`` is the width of the sequence-score head.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    attention_bias: bool = False
    o_proj_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: Any = None
    num_labels: int = 1
    model_type: str = "llama"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, Mapping):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        set_("dtype", jnp.dtype(self.dtype))
        set_("param_dtype", jnp.dtype(self.param_dtype))
        for f in _REQUIRED + ("num_key_value_heads", "head_dim", "num_labels"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"LlamaConfig.{f} must be a positive int, got {getattr(self, f)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for rotary embeddings")
        rope = self.rope_params
        if rope["rope_type"] not in _ROPE_TYPES:
            raise ValueError(f"LlamaConfig.rope_scaling: rope_type {rope['rope_type']!r} is not supported; "
                             f"supported: {sorted(_ROPE_TYPES)}")
        for k in _ROPE_TYPES[rope["rope_type"]]:
            if k not in rope:
                raise ValueError(f"LlamaConfig.rope_scaling: rope_type {rope['rope_type']!r} needs {k!r}")

    @property
    def rope_params(self) -> dict:
        rope = dict(self.rope_scaling or ())
        rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        if rope["rope_type"] == "llama3":
            rope.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return rope

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], path: str = "config.json", **overrides) -> "LlamaConfig":
        """From a transformers ``config.json`` dict (model_type llama / mistral / qwen2).

        ``path`` only names the file in errors. ``overrides`` (e.g. ``dtype``) replace fields.
        """
        mt = cfg.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"{path}: model_type {mt!r} is not a Llama-family model; supported: {MODEL_TYPES}")
        for f in _REQUIRED:
            if cfg.get(f) is None:
                raise ValueError(f"{path}: required field {f!r} is missing")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias"):
            raise ValueError(f"{path}: mlp_bias=true is not supported")
        if mt == "qwen2" and cfg.get("use_sliding_window"):
            raise ValueError(f"{path}: use_sliding_window=true is not supported; set it to false")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"{path}: rope_type {rope_type!r} is not supported; supported: {sorted(_ROPE_TYPES)}")
        scaling = None if rope_type == "default" else {"rope_type": rope_type,
                                                       **{k: rope[k] for k in _ROPE_TYPES[rope_type] if k in rope}}
        bias = bool(cfg.get("attention_bias", False))
        fields = dict(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), rope_scaling=scaling,
            attention_bias=True if mt == "qwen2" else bias, o_proj_bias=False if mt == "qwen2" else bias,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            sliding_window=cfg.get("sliding_window") if mt == "mistral" else None,
            pad_token_id=cfg.get("pad_token_id"), bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"), model_type=mt)
        fields.update(overrides)
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_hf(self, architecture: str = "LlamaForCausalLM") -> dict:
        """A transformers ``config.json`` dict describing this architecture (fp32 weights)."""
        rope = {"rope_theta": self.rope_theta, **self.rope_params}
        if self.model_type == "qwen2" or self.attention_bias != self.o_proj_bias:
            if self.model_type != "qwen2" or not self.attention_bias or self.o_proj_bias:
                raise ValueError("LlamaConfig.to_hf: q/k/v bias without o_proj bias exists only as qwen2")
        out = {
            "architectures": [architecture], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope, "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "dtype": "float32",
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out

    def check_length(self, total: int):
        """Reject sequences the sliding window would change (we implement full causal attention only)."""
        if self.sliding_window is not None and total > self.sliding_window:
            raise ValueError(f"sequence of {total} tokens exceeds Mistral sliding_window={self.sliding_window}; "
                             f"sliding-window attention is not implemented, keep sequences within the window")


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies (E/2,) in float32, computed as transformers' ``rope_init_fn`` for the type."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32)
                                                 / np.float32(dim)))).astype(np.float32)
    rope = cfg.rope_params
    if rope["rope_type"] == "linear":
        inv = (inv / np.float32(rope["factor"])).astype(np.float32)
    elif rope["rope_type"] == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = (2 * math.pi / inv).astype(np.float32)
        inv_l = np.where(wavelen > old / lo, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    return inv


# ----------------------------------------------------------------------------------------------- layers

def _constrain(x, names, mesh, rules):
    """Sharding constraint on an activation by logical axis names (no-op without a mesh)."""
    if mesh is None:
        return x
    spec = mesh_lib.logical_to_mesh_spec(names, rules)
    # a dimension the mesh axes do not divide (e.g. a 4-row micro-batch on 8 batch shards) is left to XLA
    spec = [s if s is None or n % math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s)) == 0
            else jax.sharding.PartitionSpec.UNCONSTRAINED for n, s in zip(x.shape, spec)]
    return lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


class RMSNorm(nn.Module):
    """``w * (x / rms(x))``; the normalisation runs in fp32 and is cast back, as in transformers."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Proj(nn.Module):
    """``x @ kernel (+ bias)`` with a (in, out) kernel named by logical axes, plus an optional LoRA path."""

    features: int
    names: tuple[str, str]
    use_bias: bool
    dtype: Any
    param_dtype: Any
    lora: lora_lib.LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, adapter=None):
        init = nn.initializers.normal(0.02)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names),
                            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.names[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if adapter is not None and self.lora is not None:
            rng = None
            if not self.deterministic and self.lora.dropout > 0:
                rng = self.make_rng("dropout")
            y = y + lora_lib.delta(x.astype(self.dtype), adapter, self.lora, rng).astype(y.dtype)
        return y


def apply_rope(x_BxTxNxE, cos_BxTxE, sin_BxTxE):
    """HF's ``x * cos + rotate_half(x) * sin`` (checkpoints are already permuted for rotate_half)."""
    half = x_BxTxNxE.shape[-1] // 2
    rot = jnp.concatenate([-x_BxTxNxE[..., half:], x_BxTxNxE[..., :half]], axis=-1)
    return x_BxTxNxE * cos_BxTxE[:, :, None] + rot * sin_BxTxE[:, :, None]


QUERY_BLOCK = 128  # queries per block of ``attend`` (calls of at least two blocks' worth of tokens)


def attend(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, allowed_BxTxS, dtype):
    """Softmax attention of T queries over S key slots where ``allowed``.

    Heads-major layout (``B, K, ., E``) keeps (batch, kv head) as the leading batch dims of both
    matmuls, so a cache is read in place, never transposed. Scores of masked pairs are
    ``finfo(float32).min`` (as transformers): a fully masked row (a left-pad query) is uniform, not NaN.

    Long calls (prefill, scoring, the PPO passes) run over blocks of ``QUERY_BLOCK`` queries, one block at a time
    and each rematerialised for its backward pass, so the float32 scores of a block (``B x H x 128 x S``) are all
    that exist at once: the whole ``B x H x T x S`` scores of a layer did not fit on chip and went through HBM
    several times (most of a PPO micro-batch's traffic on v5e-8, docs/tpu_compile.md). Every query still
    attends over all S keys in one softmax: the values are those of the unblocked computation. 128 queries: each
    block reads the keys and values again, and larger blocks' scores spill (a micro-batch's HBM bytes on v4-32 /
    v5e-8 with blocks of 64 queries: 24.9 GB / -, 128: 27.9 / 12.9, 256: 41.3 / 13.5, 512: 60.9 / 19.6).
    """
    T = q_BxKxGxTxE.shape[3]
    if T < 2 * QUERY_BLOCK or T % QUERY_BLOCK:
        return _attend(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, allowed_BxTxS, dtype)
    B, K, G, _, E = q_BxKxGxTxE.shape
    n = T // QUERY_BLOCK
    q_NxBxKxGxQxE = jnp.moveaxis(q_BxKxGxTxE.reshape(B, K, G, n, QUERY_BLOCK, E), 3, 0)
    a_NxBxQxS = jnp.moveaxis(allowed_BxTxS.reshape(allowed_BxTxS.shape[0], n, QUERY_BLOCK, -1), 1, 0)
    block = jax.checkpoint(lambda qa: _attend(qa[0], k_BxKxSxE, v_BxKxSxE, qa[1], dtype))
    out_NxBxKxGxQxE = lax.map(block, (q_NxBxKxGxQxE, a_NxBxQxS))
    return jnp.moveaxis(out_NxBxKxGxQxE, 0, 3).reshape(B, K, G, T, E)


def _attend(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE, allowed_BxTxS, dtype):
    E = q_BxKxGxTxE.shape[-1]
    q = q_BxKxGxTxE * jnp.asarray(E ** -0.5, dtype)
    s = jnp.einsum("bkgte,bkse->bkgts", q, k_BxKxSxE.astype(dtype), preferred_element_type=jnp.float32)
    s = jnp.where(allowed_BxTxS[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bkse->bkgte", p, v_BxKxSxE.astype(dtype))


def attend_cached(q_BxKxGxTxE, kc_BxKxSxE, vc_BxKxSxE, k_BxKxTxE, v_BxKxTxE, cached_BxTxS, new_BxTxT, dtype):
    """``attend`` over a KV cache's slots where ``cached`` and this call's own keys where ``new``, in one softmax,
    the two value sums added in float32. The cache is read as it is stored and not written here: the caller writes
    the new keys into it after every layer has read it (``Llama._layers``)."""
    E, S = q_BxKxGxTxE.shape[-1], kc_BxKxSxE.shape[2]
    q = q_BxKxGxTxE * jnp.asarray(E ** -0.5, dtype)
    lo = jnp.finfo(jnp.float32).min
    s_c = jnp.einsum("bkgte,bkse->bkgts", q, kc_BxKxSxE.astype(dtype), preferred_element_type=jnp.float32)
    s_n = jnp.einsum("bkgte,bkue->bkgtu", q, k_BxKxTxE.astype(dtype), preferred_element_type=jnp.float32)
    s = jnp.concatenate([jnp.where(cached_BxTxS[:, None, None], s_c, lo),
                         jnp.where(new_BxTxT[:, None, None], s_n, lo)], axis=-1)
    p = jax.nn.softmax(s, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bkse->bkgte", p[..., :S], vc_BxKxSxE.astype(dtype), preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bkgtu,bkue->bkgte", p[..., S:], v_BxKxTxE.astype(dtype),
                           preferred_element_type=jnp.float32)
    return out.astype(dtype)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU block: ``(x, per-layer xs) -> (x, k/v)``, where k/v are this call's
    keys/values, or with a cache in ``xs`` the layer's cache buffers with them written at ``index`` -- unless
    ``write_cache_last``: then the layer attends over the cache's slots and its own keys (``attend_cached``), leaves
    the cache unwritten and returns its keys/values (``Llama._layers`` writes them after every layer)."""

    config: LlamaConfig
    lora: lora_lib.LoraConfig | None = None
    deterministic: bool = True
    mesh: Any = None
    rules: tuple = mesh_lib.DEFAULT_RULES
    write_cache_last: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, xs, cos_BxTxE, sin_BxTxE, allowed, index):
        cfg, dt = self.config, self.config.dtype
        B, T, _ = x_BxTxD.shape
        H, K, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        ad = xs.get("lora") or {}
        proj = functools.partial(Proj, dtype=dt, param_dtype=cfg.param_dtype, lora=self.lora,
                                 deterministic=self.deterministic)
        con = functools.partial(_constrain, mesh=self.mesh, rules=self.rules)
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, dt, cfg.param_dtype)

        h = norm(name="input_layernorm")(x_BxTxD)
        q = proj(H * E, ("embed", "heads"), cfg.attention_bias, name="q_proj")(h, ad.get("q_proj"))
        k = proj(K * E, ("embed", "kv_heads"), cfg.attention_bias, name="k_proj")(h, ad.get("k_proj"))
        v = proj(K * E, ("embed", "kv_heads"), cfg.attention_bias, name="v_proj")(h, ad.get("v_proj"))
        q = apply_rope(q.reshape(B, T, H, E), cos_BxTxE, sin_BxTxE)
        q = con(q.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4), ("batch", "kv_heads", None, "length", "head_dim"))
        k = apply_rope(k.reshape(B, T, K, E), cos_BxTxE, sin_BxTxE)
        k = con(k.transpose(0, 2, 1, 3), ("batch", "kv_heads", "length", "head_dim"))
        v = con(v.reshape(B, T, K, E).transpose(0, 2, 1, 3), ("batch", "kv_heads", "length", "head_dim"))
        cache = xs.get("cache")
        if cache is not None and self.write_cache_last:
            att_BxKxGxTxE = attend_cached(q, cache["k"], cache["v"], k, v, *allowed, dt)
        else:
            if cache is not None:  # write first, then attend over the updated buffer (in place)
                k = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, index, 0))
                v = lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, index, 0))
            att_BxKxGxTxE = attend(q, k, v, allowed, dt)
        att = att_BxKxGxTxE.transpose(0, 3, 1, 2, 4).reshape(B, T, H * E)
        o = proj(cfg.hidden_size, ("heads", "embed"), cfg.o_proj_bias, name="o_proj")(att, ad.get("o_proj"))
        x_BxTxD = con(x_BxTxD + o, ("batch", "length", "embed"))

        h = norm(name="post_attention_layernorm")(x_BxTxD)
        g = proj(cfg.intermediate_size, ("embed", "mlp"), False, name="gate_proj")(h, ad.get("gate_proj"))
        u = proj(cfg.intermediate_size, ("embed", "mlp"), False, name="up_proj")(h, ad.get("up_proj"))
        m = con(nn.silu(g) * u, ("batch", "length", "mlp"))
        m = proj(cfg.hidden_size, ("mlp", "embed"), False, name="down_proj")(m, ad.get("down_proj"))
        x_BxTxD = con(x_BxTxD + m, ("batch", "length", "embed"))
        return x_BxTxD, {"k": k, "v": v}


class Llama(nn.Module):
    """Embeddings -> scanned decoder layers -> final norm -> heads.

    ``head``: ``'lm'`` (logits, tied to the embedding when the config says so) or ``'score'``
    (per-token scores of width ``num_labels``, pooled by the caller). ``value_head`` adds per-token
    scalar values (``Dense(1)`` with bias, for PPO on the shared trunk). ``scan=False`` applies
    per-layer params (``layers_{i}``: ``load_pretrained(layer_layout='per_layer')`` or ``unstack_layers``),
    the fast form for one-token decode steps on CPU/GPU. ``last_only`` computes heads
    at the last position only (prefill of a generator). Returns a dict with ``hidden`` (post final norm),
    the head outputs, and ``kv``: the new keys/values: per layer ``(B, K, T, E)``, for the cache; with a
    ``cache``, the cache's buffers with them written.

    ``write_cache_last`` (a decode step on an accelerator): every layer reads its cache buffer before any is
    written, and the writes come last, in place (``_write_cache``). Written before its layer attends over it,
    a buffer was brought on chip by XLA's TPU compiler, updated there and written back whole at every step (1.8 GB
    per decode step on v4-8, docs/tpu_compile.md); XLA:CPU instead copies a buffer that is read before it is
    updated in place, so there each layer writes first (``rre_jax.programs`` / ``rollout`` choose by backend).
    """

    config: LlamaConfig
    head: str = "lm"
    value_head: bool = False
    lora: lora_lib.LoraConfig | None = None
    deterministic: bool = True
    remat: str = "none"  # REMAT: what the backward pass keeps of each layer's forward (see ``_layer_class``)
    scan: bool = True
    mesh: Any = None
    rules: tuple = mesh_lib.DEFAULT_RULES
    write_cache_last: bool = False

    @nn.compact
    def __call__(self, ids_BxT, positions_BxT, mask_BxT, cache=None, lora=None, last_only=False):
        cfg, dt = self.config, self.config.dtype
        embed = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                           (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype)
        x = self._con(jnp.take(embed, ids_BxT, axis=0).astype(dt), ("batch", "length", "embed"))
        cos, sin = _rope_tables(cfg, positions_BxT)
        index, allowed = _visible(mask_BxT, cache, self.write_cache_last)
        x, kv = self._layers(x, (cos, sin, allowed, index), cache, lora)
        h = RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name="norm")(x)
        if last_only:
            h = h[:, -1:]
        return {"hidden": h, "kv": kv, **self._heads(h, embed)}

    def _con(self, x, names):
        return _constrain(x, names, self.mesh, self.rules)

    def _layers(self, x, args, cache, lora):
        """The decoder layers (scanned ``layers``, or ``layers_{i}`` one by one): ``(x, kv)``, kv per layer."""
        cfg, layer, L = self.config, _layer_class(self.remat), self.config.num_hidden_layers
        if self.scan:
            stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=L, metadata_params={nn.PARTITION_NAME: "layers"})
            xs = {"cache": None if cache is None else {"k": jnp.stack(cache["k"]), "v": jnp.stack(cache["v"])},
                  "lora": None if lora is None else lora["layers"]}
            x, kv = stack(cfg, self.lora, self.deterministic, self.mesh, self.rules, self.write_cache_last,
                          name="layers")(x, xs, *args)
            kv = {n: tuple(kv[n][i] for i in range(L)) for n in ("k", "v")}
        else:  # per-layer params ``layers_{i}`` (see ``unstack_layers``): no per-step weight slicing
            kv = {"k": (), "v": ()}
            for i in range(L):
                xs = {"cache": None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]},
                      "lora": None if lora is None else lora[f"layers_{i}"]}
                x, kv_i = layer(cfg, self.lora, self.deterministic, self.mesh, self.rules, self.write_cache_last,
                                name=f"layers_{i}")(x, xs, *args)
                kv = {n: (*kv[n], kv_i[n]) for n in ("k", "v")}
        return x, (_write_cache(cache, kv, x, args[-1]) if cache is not None and self.write_cache_last else kv)

    def _heads(self, h, embed) -> dict:
        """``logits`` (head 'lm') or ``scores`` (head 'score'), and ``values`` with a value head, from ``h``."""
        cfg, dt = self.config, self.config.dtype
        dense = lambda name, axes, shape, init=nn.initializers.normal(0.02): self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)
        out = {}
        if self.head == "lm":
            w = embed.T if cfg.tie_word_embeddings else dense("lm_head", ("embed", "vocab"),
                                                              (cfg.hidden_size, cfg.vocab_size))
            out["logits"] = self._con(jnp.einsum("btd,dv->btv", h, w.astype(dt), preferred_element_type=jnp.float32),
                                      ("batch", "length", "vocab"))
        elif self.head == "score":
            w = dense("score", ("embed", "classes"), (cfg.hidden_size, cfg.num_labels))
            out["scores"] = jnp.einsum("btd,dc->btc", h, w.astype(dt), preferred_element_type=jnp.float32)
        else:
            raise ValueError(f"Llama.head must be 'lm' or 'score', got {self.head!r}")
        if self.value_head:
            vw = dense("value_head", ("embed", "classes"), (cfg.hidden_size, 1))
            vb = dense("value_bias", ("classes",), (1,), nn.initializers.zeros)
            out["values"] = (jnp.einsum("btd,dc->btc", h, vw.astype(dt), preferred_element_type=jnp.float32)
                             + vb.astype(jnp.float32))[..., 0]
        return out


def _rope_tables(cfg: LlamaConfig, positions_BxT):
    """RoPE ``(cos, sin)`` of each position, ``[B, T, E]`` in the compute dtype."""
    freqs = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(cfg.dtype), jnp.sin(emb).astype(cfg.dtype)


def _write_cache(cache, kv, x_BxTxD, index):
    """The layers' cache buffers with this call's keys and values (``kv``: per layer ``(B, K, T, E)``) written at
    ``index``, in place: the writes wait (``lax.optimization_barrier`` with the last layer's output) until every layer
    has read its buffer (``Llama.write_cache_last``)."""
    (ks, vs), _ = lax.optimization_barrier(((cache["k"], cache["v"]), x_BxTxD))
    upd = lambda c, new: lax.dynamic_update_slice(c, new.astype(c.dtype), (0, 0, index, 0))  # noqa: E731
    return {"k": tuple(map(upd, ks, kv["k"])), "v": tuple(map(upd, vs, kv["v"]))}


def _visible(mask_BxT, cache, write_cache_last: bool = False):
    """``(index, allowed)``: the cache slot of the first new token (0 without a cache) and which keys each new token
    attends to. Without a cache ``allowed_BxTxT``: causal over the real tokens. With one, ``allowed_BxTxS``: slot s is
    visible to new token t if it is real and s <= index + t (the new keys written first); or with
    ``write_cache_last`` ``(cached_BxTxS, new_BxTxT)`` (``attend_cached``): a cache slot if it is real and written
    before this call (s < index), a new token if it is real and not after this one."""
    B, T = mask_BxT.shape
    causal_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & mask_BxT[:, None, :].astype(bool)
    if cache is None:
        return 0, causal_BxTxT
    index = cache["index"]
    S = cache["mask"].shape[1]
    if not write_cache_last:
        real_BxS = lax.dynamic_update_slice(cache["mask"], mask_BxT.astype(cache["mask"].dtype), (0, index))
        causal_TxS = jnp.arange(S)[None, :] <= index + jnp.arange(T)[:, None]
        return index, causal_TxS[None] & real_BxS[:, None, :].astype(bool)
    cached_BxS = cache["mask"].astype(bool) & (jnp.arange(S) < index)[None]
    return index, (jnp.broadcast_to(cached_BxS[:, None, :], (B, T, S)), causal_BxTxT)


# ------------------------------------------------------------------------------------- pure functions

def positions_from_mask(mask_BxT):
    """RoPE positions of a left- or right-padded batch: index among the row's real tokens (pads -> 0)."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("head", "value_head"))
def init_params(cfg: LlamaConfig, rng, head: str = "lm", value_head: bool = False):
    """Random boxed-free params (a plain dict) of a ``Llama`` with ``head``; for tests and from-scratch runs.

    One compiled program: an eager init dispatches (and keeps the compiled code of) hundreds of small ops,
    which cost about twice the params' size in resident memory for the mid model."""
    model = Llama(cfg, head=head, value_head=value_head)
    ids = jnp.zeros((1, 2), jnp.int32)
    return nn.meta.unbox(model.init(rng, ids, ids, jnp.ones((1, 2), jnp.int32))["params"])


def abstract_init_fn(cfg: LlamaConfig, head: str = "lm", value_head: bool = False, layer_layout: str = "stacked"):
    """``rng -> boxed params`` for ``rre_jax.mesh.abstract_params`` / ``init_sharded``, in ``layer_layout``."""
    _check_layout(layer_layout)
    model = Llama(cfg, head=head, value_head=value_head, scan=layer_layout == "stacked")
    ids = jnp.zeros((1, 2), jnp.int32)
    return lambda rng: model.init(rng, ids, ids, jnp.ones((1, 2), jnp.int32))["params"]


REMAT = ("none", "dots", "full")


def check_remat(remat: str) -> str:
    """``remat`` if it names a rematerialisation policy, else an error naming ``config.model.remat``."""
    if remat not in REMAT:
        raise ValueError(f"config.model.remat={remat!r}; choose one of {REMAT} ('none': keep every activation "
                         "for the backward pass; 'dots': keep only the projections' outputs and recompute attention "
                         "and the elementwise ops; 'full': keep only each layer's input and recompute the layer)")
    return remat


def _layer_class(remat: str):
    """``DecoderLayer``, wrapped in ``nn.remat`` with the policy ``remat`` names.

    'dots' (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``) saves the outputs of the projections
    (the matmuls against weights, LoRA's included) and recomputes attention -- its scores and probabilities, batched
    over rows and heads -- norms, RoPE, softmax and SiLU in the backward pass: the saved activations grow with the
    sequence, never with its square (saving the float32 scores of every layer was 4.3 GB per device on v5e-8,
    docs/tpu_compile.md), for about 4% more update FLOPs at 1,024 tokens. 'full' recomputes the whole layer (a
    third more update FLOPs, least memory).
    """
    check_remat(remat)
    if remat == "full":
        return nn.remat(DecoderLayer, prevent_cse=False)
    if remat == "dots":
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        return nn.remat(DecoderLayer, prevent_cse=False, policy=policy)
    return DecoderLayer


@functools.partial(jax.jit, static_argnames=("cfg", "head", "value_head", "lora_cfg", "mesh", "rules", "remat"))
def forward(cfg: LlamaConfig, params, ids_BxT, mask_BxT, *, head="lm", value_head=False, lora=None,
            lora_cfg=None, rng=None, mesh=None, rules=mesh_lib.DEFAULT_RULES, remat="none"):
    """Full (no cache) forward; returns the ``Llama`` output dict. ``rng`` enables LoRA dropout; ``remat``
    (``REMAT``) chooses what a backward pass through it keeps (values are the same for every choice)."""
    cfg.check_length(ids_BxT.shape[1])
    lora = _lora_like(params, lora)
    model = Llama(cfg, head=head, value_head=value_head, lora=lora_cfg, deterministic=rng is None,
                  remat=remat, scan=layer_layout(params) == "stacked", mesh=mesh, rules=rules)
    rngs = None if rng is None else {"dropout": rng}
    return model.apply({"params": params}, ids_BxT, positions_from_mask(mask_BxT), mask_BxT,
                       lora=lora, rngs=rngs)


def init_cache(cfg: LlamaConfig, batch: int, length: int):
    """An empty KV cache for ``batch`` rows and ``length`` slots, in the compute dtype (one buffer per
    layer, so each decode step updates it in place)."""
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    L = cfg.num_hidden_layers
    return {"k": tuple(jnp.zeros(shape, cfg.dtype) for _ in range(L)),
            "v": tuple(jnp.zeros(shape, cfg.dtype) for _ in range(L)),
            "mask": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32),
            "pos": jnp.zeros((batch,), jnp.int32)}


def unstack_layers(tree):
    """``{'layers': stacked (L, ...)}`` -> ``{'layers_0': ..., 'layers_1': ...}`` for params or LoRA trees.

    Do it once outside a decode loop: stacked params would be sliced (copied) layer by layer every step.
    """
    if tree is None or "layers" not in tree:
        return tree
    L = jax.tree.leaves(tree["layers"])[0].shape[0]
    out = {k: v for k, v in tree.items() if k != "layers"}
    out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], tree["layers"]) for i in range(L)})
    return out


def _check_layout(layout: str):
    if layout not in LAYER_LAYOUTS:
        raise ValueError(f"layer_layout must be one of {LAYER_LAYOUTS}, got {layout!r}")


def layer_layout(params) -> str:
    """``'stacked'`` (a ``layers`` subtree with a leading L axis) or ``'per_layer'`` (``layers_{i}``)."""
    if "layers" in params:
        return "stacked"
    if "layers_0" in params:
        return "per_layer"
    raise ValueError(f"not Llama params: neither 'layers' nor 'layers_0' among the keys {sorted(params)[:8]}")


def _lora_like(params, lora):
    """``lora`` in the layer layout of ``params`` (a stacked LoRA tree is split for per-layer params)."""
    if lora is None or layer_layout(params) == "per_layer":
        return unstack_layers(lora)
    if "layers" not in lora:
        raise ValueError("per-layer LoRA adapters need per-layer params: load the model with "
                         "layer_layout='per_layer', or keep the adapters stacked")
    return lora


def _advance(cache, kv, mask_BxT):
    """The cache after a call that wrote ``kv`` (updated per-layer buffers) at ``cache['index']``."""
    i = cache["index"]
    mask = lax.dynamic_update_slice(cache["mask"], mask_BxT.astype(jnp.int32), (0, i))
    return {"k": kv["k"], "v": kv["v"], "mask": mask, "index": i + mask_BxT.shape[1],
            "pos": cache["pos"] + mask_BxT.sum(-1).astype(jnp.int32)}


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "lora_cfg", "mesh", "rules"))
def prefill(cfg: LlamaConfig, params, ids_BxT, mask_BxT, cache_len: int, *, lora=None, lora_cfg=None,
            mesh=None, rules=mesh_lib.DEFAULT_RULES, cache=None):
    """Run a (left-padded) prompt batch; returns (last-position logits ``BxV``, filled cache). ``cache``: the
    empty ``init_cache(cfg, B, cache_len)`` to fill (e.g. created in its shardings); default: a new one."""
    cfg.check_length(cache_len)
    lora = _lora_like(params, lora)
    model = Llama(cfg, head="lm", lora=lora_cfg, scan=layer_layout(params) == "stacked", mesh=mesh, rules=rules)
    out = model.apply({"params": params}, ids_BxT, positions_from_mask(mask_BxT), mask_BxT, lora=lora,
                      last_only=True)
    cache = init_cache(cfg, ids_BxT.shape[0], cache_len) if cache is None else cache
    upd = lambda c, new: lax.dynamic_update_slice(c, new.astype(c.dtype), (0, 0, 0, 0))
    kv = {n: tuple(upd(c, new) for c, new in zip(cache[n], out["kv"][n])) for n in ("k", "v")}
    return out["logits"][:, -1], _advance(cache, kv, mask_BxT)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "mesh", "rules", "write_cache_last"),
                   donate_argnames=("cache",))
def decode_step(cfg: LlamaConfig, params, token_B, cache, *, lora=None, lora_cfg=None, mesh=None,
                rules=mesh_lib.DEFAULT_RULES, write_cache_last: bool = False):
    """One new token per row at each row's next position; returns (logits ``BxV``, updated cache).

    ``params`` (and ``lora``) may be stacked or per-layer; per-layer is what a loop wants (a stacked
    weight is sliced, i.e. copied, on every call). ``write_cache_last``: see ``Llama`` (True on accelerators).
    """
    model = Llama(cfg, head="lm", lora=lora_cfg, scan=False, mesh=mesh, rules=rules, write_cache_last=write_cache_last)
    params, lora = unstack_layers(params), unstack_layers(lora)
    mask_Bx1 = jnp.ones((token_B.shape[0], 1), jnp.int32)
    out = model.apply({"params": params}, token_B[:, None], cache["pos"][:, None], mask_Bx1, cache=cache,
                      lora=lora)
    return out["logits"][:, -1], _advance(cache, out["kv"], mask_Bx1)


def pool_last_real(scores_BxTxC, mask_BxT):
    """Score at each row's last real token by attention mask (HF ``*ForSequenceClassification``)."""
    T = mask_BxT.shape[1]
    last_B = jnp.max(jnp.where(mask_BxT.astype(bool), jnp.arange(T), 0), axis=-1)
    return jnp.take_along_axis(scores_BxTxC, last_B[:, None, None], axis=1)[:, 0]


def pool_before_first_pad(scores_BxTxC, ids_BxT, pad_id: int = 0):
    """Score at the position before each row's first ``pad_id`` (Starling-RM; no pad -> last position;
    a pad at position 0 wraps to the last position, as the reference's ``rewards[i, c_ind - 1]``)."""
    T = ids_BxT.shape[1]
    first_B = jnp.min(jnp.where(ids_BxT == pad_id, jnp.arange(T), T), axis=-1)
    idx_B = (first_B - 1) % T
    return jnp.take_along_axis(scores_BxTxC, idx_B[:, None, None], axis=1)[:, 0]


# --------------------------------------------------------------------------------- HF checkpoints

KINDS = ("causal_lm", "seq_cls", "starling")
_LAYER_NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj"}


def head_of(kind: str) -> str:
    return "lm" if kind == "causal_lm" else "score"


def weight_map(cfg: LlamaConfig, kind: str = "causal_lm", layer_layout: str = "stacked") -> dict:
    """Our param path -> HF tensor(s), for the three checkpoint layouts:

    ``causal_lm`` (``model.*`` + ``lm_head``, or tied), ``seq_cls`` (``LlamaForSequenceClassification``:
    ``model.*`` + ``score``, no bias) and ``starling`` (Starling-RM: ``transformer.*`` + ``v_head``, no bias).
    HF Linear weights are ``(out, in)``; ours are ``(in, out)``. ``layer_layout='stacked'`` maps each
    layer weight to a ``StackedWeightSpec`` under ``layers``; ``'per_layer'`` to one tensor per ``layers_{i}``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
    _check_layout(layer_layout)
    pre = "transformer." if kind == "starling" else "model."
    L = cfg.num_hidden_layers
    per = lambda suffix: tuple(f"{pre}layers.{i}.{suffix}" for i in range(L))

    def put(path, names, transpose=None):
        if layer_layout == "stacked":
            wm[("layers",) + path] = StackedWeightSpec(names, transpose)
        else:
            wm.update({(f"layers_{i}",) + path: WeightSpec(n, transpose) for i, n in enumerate(names)})

    wm = {("embedding",): WeightSpec(pre + "embed_tokens.weight"), ("norm", "scale"): WeightSpec(pre + "norm.weight")}
    for ln in ("input_layernorm", "post_attention_layernorm"):
        put((ln, "scale"), per(ln + ".weight"))
    for ours, theirs in _LAYER_NAMES.items():
        put((ours, "kernel"), per(theirs + ".weight"), (1, 0))
        if (ours in ("q_proj", "k_proj", "v_proj") and cfg.attention_bias) or (ours == "o_proj" and cfg.o_proj_bias):
            put((ours, "bias"), per(theirs + ".bias"))
    if kind == "causal_lm" and not cfg.tie_word_embeddings:
        wm[("lm_head",)] = WeightSpec("lm_head.weight", (1, 0))
    elif kind != "causal_lm":
        wm[("score",)] = WeightSpec("v_head.weight" if kind == "starling" else "score.weight", (1, 0))
    return wm


def detect_kind(names) -> str:
    """Checkpoint layout from its tensor names: ``v_head.weight`` -> starling, ``score.weight`` -> seq_cls."""
    names = set(names)
    if "v_head.weight" in names:
        return "starling"
    if "score.weight" in names:
        return "seq_cls"
    return "causal_lm"


def load_pretrained(path: str, *, mesh=None, rules=mesh_lib.DEFAULT_RULES, dtype=jnp.float32,
                    param_dtype=None, kind: str | None = None, device=None, layer_layout: str = "stacked"):
    """(kind, config, params) of a Llama-family HF directory, streamed tensor by tensor (shard by shard
    on a mesh) straight into the params' target shardings. ``device`` (e.g. ``jax.devices('cpu')[0]``)
    instead puts every tensor on that one device: host memory for a model brought in only for eval.
    ``layer_layout='per_layer'`` gives one array per layer weight (``layers_{i}``): the layout for
    generation, which then never copies the layer weights; training wants the default ``'stacked'``."""
    cfg_path = os.path.join(path, "config.json")
    ckpt = hf.SafetensorsDir(path)
    kind = kind or detect_kind(ckpt.keys())
    over = {"dtype": dtype, "param_dtype": param_dtype or dtype}
    if kind != "causal_lm":
        head = "v_head.weight" if kind == "starling" else "score.weight"
        over["num_labels"] = ckpt.refs[head].shape[0]
    cfg = LlamaConfig.from_hf(hf.read_config(path), cfg_path, **over)
    abstract, specs = mesh_lib.abstract_params(abstract_init_fn(cfg, head=head_of(kind), layer_layout=layer_layout))
    shardings = None if mesh is None else mesh_lib.logical_shardings(specs, mesh, rules)
    if device is not None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
    tied = cfg.tie_word_embeddings and kind == "causal_lm"
    ignore = lambda n: n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight")
    params = hf.load_params(ckpt, weight_map(cfg, kind, layer_layout), abstract, shardings, ignore=ignore)
    return kind, cfg, params


def export_pretrained(directory: str, cfg: LlamaConfig, params, *, lora=None, lora_cfg=None,
                      max_shard_bytes: int = 5 << 30):
    """Write a causal-LM policy (LoRA merged when given) as an HF directory transformers loads."""
    layout = layer_layout(params)
    if lora is not None:
        if layout != "stacked":
            raise ValueError("export_pretrained merges LoRA into stacked params only; load the model with "
                             "layer_layout='stacked' to export a LoRA-tuned policy")
        params = lora_lib.merge(params, lora, lora_cfg)
    tensors = hf.export_tensors(params, weight_map(cfg, "causal_lm", layout), np.float32)
    hf.save_safetensors(tensors, directory, max_shard_bytes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf("LlamaForCausalLM" if cfg.model_type == "llama" else
                            {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]), f, indent=2)
