"""BERT encoder (post-LN, absolute positions) for the relevance features QR and AR.

The white-box reward scores relevance as the dot product of mean-pooled last hidden states of a BERT
encoder (facebook/contriever in the paper; all-MiniLM-L6-v2 offline). This module is the encoder and
its Hugging Face checkpoint layout; ``rre_jax.relevance`` does the host tokenization and batching.

Shapes: B batch, T tokens, D hidden size (``hidden_size``), H attention heads, K head size (D / H),
F FFN hidden size (``intermediate_size``).

Numerics follow ``transformers.BertModel`` in eval mode (dropout off): embeddings word + position +
token type, LayerNorm, then per layer ``LN(x + Attn(x))`` and ``LN(h + W2 act(W1 h))``. LayerNorm uses
the two-pass variance (as torch does) and the config's ``layer_norm_eps``; softmax and LayerNorm run in
float32 whatever the parameter dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rre_jax import mesh as mesh_lib
from rre_jax.models import hf

# HF ``hidden_act`` -> function. 'gelu' is the exact (erf) GELU; the tanh variants are approximations.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The encoder's shape and numerics; validated on construction. Hashable, so usable as a jit static."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        for name in _REQUIRED + ("type_vocab_size",):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"BertConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: dict, path: str = "config.json") -> "BertConfig":
        """From a Hugging Face ``config.json`` dict; ``path`` only names the file in error messages."""
        missing = [k for k in _REQUIRED if k not in config]
        if missing:
            raise ValueError(f"{path}: missing BERT field(s) {missing}")
        model_type = config.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{path}: model_type {model_type!r} is not 'bert' (RoBERTa/DistilBERT-style "
                             f"encoders have a different layout and are not supported)")
        pos = config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"{path}: position_embedding_type {pos!r} is not supported (only 'absolute')")
        for flag in ("is_decoder", "add_cross_attention"):
            if config.get(flag, False):
                raise ValueError(f"{path}: {flag}=true is not supported; the relevance encoder is a "
                                 f"bidirectional encoder without cross-attention")
        act = config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        try:
            return cls(**{k: config[k] for k in _REQUIRED},
                       type_vocab_size=config.get("type_vocab_size", 2), hidden_act=act,
                       layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                       pad_token_id=config.get("pad_token_id") or 0)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e


def _init(init, *axes):
    return nn.with_logical_partitioning(init, axes)


_normal = nn.initializers.normal(0.02)


def _layer_norm(cfg: BertConfig, param_dtype, name: str) -> nn.LayerNorm:
    """LayerNorm computed in float32 with the two-pass variance, as torch does (callers cast back)."""
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, scale_init=_init(nn.initializers.ones, "norm"),
                        bias_init=_init(nn.initializers.zeros, "norm"), name=name)


# Score block per step of the CPU attention loop: the [G, T, T] scores of G heads of one row stay in a
# core's L2 cache between the QK^T product, the softmax and the PV product.
_SCORE_BLOCK_BYTES = 1 << 20


def _probabilities(s_XxTxT, keep_XxT, head_dim: int, dtype):
    """Attention weights from raw float32 scores: scaled by 1/sqrt(head_dim), keys where ``keep`` is 0
    masked, softmax over keys in float32, cast to ``dtype`` for the PV product."""
    s_XxTxT = jnp.where(keep_XxT > 0, s_XxTxT / jnp.sqrt(jnp.float32(head_dim)), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(s_XxTxT, axis=-1).astype(dtype)


def attention_rows(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxT, precision=None):
    """Softmax attention, ``[B, T, H, K] -> [B, T, H, K]``, as one batched computation (TPU / GPU)."""
    s_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxTxHxK, precision=precision,
                           preferred_element_type=jnp.float32)
    p_BxHxTxT = _probabilities(s_BxHxTxT, mask_BxT[:, None, None, :], q_BxTxHxK.shape[-1], v_BxTxHxK.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", p_BxHxTxT, v_BxTxHxK, precision=precision)


def attention_looped(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxT, precision=None):
    """The same attention as a loop over (row, group of G heads) blocks: the CPU layout.

    Batched over all rows, XLA:CPU writes the whole ``[B, H, T, T]`` score tensor to memory between the
    matmuls and each softmax pass (``B*H*T*T*4`` bytes per layer); one block's scores fit in cache.
    G is the largest divisor of H whose ``[G, T, T]`` float32 scores fit ``_SCORE_BLOCK_BYTES``. Every block
    runs the same computation, so a row's bits do not depend on how many rows share its batch.
    """
    B, T, H, K = q_BxTxHxK.shape
    G = max(g for g in range(1, H + 1) if H % g == 0 and (g == 1 or g * T * T * 4 <= _SCORE_BLOCK_BYTES))

    def block(args):
        q_GxTxK, k_GxTxK, v_GxTxK, m_T = args
        s_GxTxT = jnp.einsum("gqk,gsk->gqs", q_GxTxK, k_GxTxK, precision=precision,
                             preferred_element_type=jnp.float32)
        p_GxTxT = _probabilities(s_GxTxT, m_T[None, None, :], K, v_GxTxK.dtype)
        return jnp.einsum("gqs,gsk->gqk", p_GxTxT, v_GxTxK, precision=precision)

    blocks = lambda x_BxTxHxK: x_BxTxHxK.transpose(0, 2, 1, 3).reshape(B * H // G, G, T, K)  # noqa: E731
    m_NxT = jnp.repeat(mask_BxT, H // G, axis=0)
    o_NxGxTxK = jax.lax.map(block, (blocks(q_BxTxHxK), blocks(k_BxTxHxK), blocks(v_BxTxHxK), m_NxT))
    return o_NxGxTxK.reshape(B, H, T, K).transpose(0, 2, 1, 3)


def attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxT, precision=None, mesh=None, batch_axes=None,
              looped: bool = False):
    """Bidirectional softmax attention over the keys ``mask_BxT`` keeps; ``[B, T, H, K] -> [B, T, H, K]``.

    One batched computation, or with ``looped`` (the XLA:CPU layout, chosen by the caller once:
    ``backend.on_xla_cpu()``) a loop over blocks of one row's heads (``attention_looped``: faster on CPU,
    docs/benchmark_results.md). With ``mesh`` the loop runs on each device's rows (``shard_map`` over
    ``batch_axes``, the mesh axes of the batch dimension), so it never iterates over a sharded dimension.
    """
    if not looped:
        return attention_rows(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxT, precision)
    looped = functools.partial(attention_looped, precision=precision)
    if mesh is None or mesh.size == 1:
        return looped(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxT)
    rows = P(batch_axes)
    return jax.shard_map(looped, mesh=mesh, in_specs=(rows, rows, rows, rows), out_specs=rows,
                         check_vma=False)(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxT)


class _Layer(nn.Module):
    """One post-LN encoder layer: ``h = LN(x + Attn(x)); LN(h + W2 act(W1 h))``.

    ``attend(q, k, v) -> a`` (all ``[B, T, H, K]``) is the attention pattern: padded rows (``attention``)
    or packed texts (``packed_attention``).
    """

    cfg: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    def _dense(self, features, axes, name):
        """Dense with kernel axes ``(in, out)``; the bias takes the ``out`` axis."""
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                        kernel_init=_init(_normal, *axes), bias_init=_init(nn.initializers.zeros, axes[1]),
                        name=name)

    def _ln(self, x, name):
        return _layer_norm(self.cfg, self.param_dtype, name)(x).astype(self.dtype)

    @nn.compact
    def __call__(self, x_BxTxD, attend):
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        H, K = cfg.num_attention_heads, cfg.head_dim
        q_BxTxHxK = self._dense(D, ("embed", "heads"), "query")(x_BxTxD).reshape(B, T, H, K)
        k_BxTxHxK = self._dense(D, ("embed", "heads"), "key")(x_BxTxD).reshape(B, T, H, K)
        v_BxTxHxK = self._dense(D, ("embed", "heads"), "value")(x_BxTxD).reshape(B, T, H, K)
        a_BxTxHxK = attend(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
        a_BxTxD = self._dense(D, ("heads", "embed"), "attn_out")(a_BxTxHxK.reshape(B, T, D))
        h_BxTxD = self._ln(x_BxTxD + a_BxTxD, "attn_ln")
        f_BxTxF = ACTIVATIONS[cfg.hidden_act](self._dense(cfg.intermediate_size, ("embed", "mlp"), "ffn_in")(h_BxTxD))
        f_BxTxD = self._dense(D, ("mlp", "embed"), "ffn_out")(f_BxTxF)
        return self._ln(h_BxTxD + f_BxTxD, "ffn_ln")


class BertEncoder(nn.Module):
    """``(input_ids_BxT, mask_BxT, token_type_ids_BxT) -> last hidden states f[B, T, D]``.

    Positions are ``0..T-1`` for every row, as ``BertModel`` uses them: pad on the right. ``mesh`` /
    ``batch_axes``: the mesh the batch rows are split over, and its axes for the batch dimension;
    ``looped_attention``: the XLA:CPU attention layout (see ``attention``). ``position_ids_BxT`` / ``attend`` replace the positions and the attention
    pattern (``embed_packed``: several texts per row, each attending to itself).
    """

    cfg: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    mesh: Any = None
    batch_axes: Any = None
    looped_attention: bool = False

    @nn.compact
    def __call__(self, input_ids_BxT, mask_BxT, token_type_ids_BxT=None, *, position_ids_BxT=None, attend=None):
        cfg = self.cfg
        T = input_ids_BxT.shape[1]
        if position_ids_BxT is None:
            if T > cfg.max_position_embeddings:
                raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                                 f"{cfg.max_position_embeddings}; truncate the input")
            position_ids_BxT = jnp.arange(T)[None, :]
        if attend is None:
            attend = functools.partial(attention, mask_BxT=mask_BxT, precision=self.precision, mesh=self.mesh,
                                       batch_axes=self.batch_axes, looped=self.looped_attention)
        if token_type_ids_BxT is None:
            token_type_ids_BxT = jnp.zeros_like(input_ids_BxT)
        embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        x_BxTxD = (embed(cfg.vocab_size, embedding_init=_init(_normal, "vocab", "embed"), name="word")(input_ids_BxT)
                   + embed(cfg.type_vocab_size, embedding_init=_init(_normal, "token_type", "embed"),
                           name="token_type")(token_type_ids_BxT)
                   + embed(cfg.max_position_embeddings, embedding_init=_init(_normal, "position", "embed"),
                           name="position")(position_ids_BxT))
        x_BxTxD = _layer_norm(cfg, self.param_dtype, "embed_ln")(x_BxTxD).astype(self.dtype)
        for i in range(cfg.num_hidden_layers):
            x_BxTxD = _Layer(cfg, self.dtype, self.param_dtype, self.precision, name=f"layer_{i}")(x_BxTxD, attend)
        return x_BxTxD


def mean_pool(hidden_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Masked mean over tokens, ``sum_t h*m / sum_t m`` in float32 (contriever / sentence-transformers).

    A row whose mask is all zero (batch padding) gives the zero vector instead of NaN.
    """
    m_BxT = mask_BxT.astype(jnp.float32)
    total_BxD = jnp.einsum("btd,bt->bd", hidden_BxTxD.astype(jnp.float32), m_BxT,
                           precision=jax.lax.Precision.HIGHEST)
    return total_BxD / jnp.maximum(m_BxT.sum(axis=1), 1e-9)[:, None]


def embed(params, cfg: BertConfig, input_ids, attention_mask, token_type_ids=None, *,
          precision=None, mesh=None, batch_axes=None, looped_attention: bool = False) -> jax.Array:
    """Mean-pooled last hidden states f32[B, D] of int[B, T] inputs. Jittable with ``cfg`` static.

    Computes in the params' dtype (bf16 params: bf16 matmuls, float32 softmax / LayerNorm / pooling).
    ``precision`` goes to every matmul: on TPU the default rounds float32 matmul inputs to bf16, pass
    ``jax.lax.Precision.HIGHEST`` for float32 parity there (CPU is full float32 by default).
    ``mesh`` / ``batch_axes``: the mesh axes the batch rows are sharded over, if any; ``looped_attention``:
    the XLA:CPU attention layout (``attention``).
    """
    dtype = params["word"]["embedding"].dtype
    model = BertEncoder(cfg, dtype=dtype, param_dtype=dtype, precision=precision, mesh=mesh,
                        batch_axes=batch_axes, looped_attention=looped_attention)
    hidden_BxTxD = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    return mean_pool(hidden_BxTxD, attention_mask)


def packed_attention(q_NxHxK, k_NxHxK, v_NxHxK, offsets_S, lengths_S, bounds, windows, precision=None):
    """Attention of each text over its own tokens, for texts packed one after another in a stream of N.

    Text s occupies tokens ``[offsets_S[s], offsets_S[s] + lengths_S[s])``. Texts are ordered by window:
    texts ``bounds[w] <= s < bounds[w + 1]`` attend within a window of ``windows[w]`` tokens starting at their
    offset (keys past their length masked, as padding is in ``attention``), so a text's computation -- and its
    bits -- depend on its own tokens and window only, never on its neighbours in the stream. Every window must
    end inside the stream (``offset + window <= N``; ``rre_jax.relevance.plan_streams`` places texts so), so
    windows longer than the stream are skipped.
    """
    out_NxHxK = jnp.zeros_like(v_NxHxK)
    for w, W in enumerate(windows):
        if W > out_NxHxK.shape[0]:  # no window this long fits the stream, so no text has it
            continue

        def text(s, out_NxHxK, W=W):
            window = lambda x: jax.lax.dynamic_slice_in_dim(x, offsets_S[s], W, axis=0)  # noqa: E731
            m_W = (jnp.arange(W) < lengths_S[s]).astype(jnp.int32)
            o_WxHxK = attention_looped(window(q_NxHxK)[None], window(k_NxHxK)[None], window(v_NxHxK)[None],
                                        m_W[None], precision)[0]
            keep_WxHxK = jnp.where(m_W[:, None, None] > 0, o_WxHxK, window(out_NxHxK))  # neighbours untouched
            return jax.lax.dynamic_update_slice_in_dim(out_NxHxK, keep_WxHxK, offsets_S[s], axis=0)
        out_NxHxK = jax.lax.fori_loop(bounds[w], bounds[w + 1], text, out_NxHxK)
    return out_NxHxK


def embed_packed(params, cfg: BertConfig, ids_N, positions_N, segments_N, offsets_S, lengths_S, bounds, *,
                 windows: tuple[int, ...], precision=None) -> jax.Array:
    """Mean-pooled embeddings f32[S, D] of texts packed in one stream of N tokens (no padding tokens).

    The CPU layout of ``embed``: every per-token layer (embeddings, projections, FFN, LayerNorm) runs on the
    N stream tokens -- real tokens only, where padded rows compute the padding too -- and attention runs text
    by text (``packed_attention``). ``positions_N``: each token's index in its text; ``segments_N``: its text
    slot (S or more for unused stream tokens); ``offsets_S`` / ``lengths_S`` / ``bounds`` / ``windows`` as in
    ``packed_attention``. Slots past ``bounds[-1]`` are unused and give zero vectors. Jittable with ``cfg``
    and ``windows`` static.
    """
    dtype = params["word"]["embedding"].dtype
    model = BertEncoder(cfg, dtype=dtype, param_dtype=dtype, precision=precision)

    def attend(q_1xNxHxK, k_1xNxHxK, v_1xNxHxK):
        return packed_attention(q_1xNxHxK[0], k_1xNxHxK[0], v_1xNxHxK[0], offsets_S, lengths_S, bounds, windows,
                                precision)[None]

    h_1xNxD = model.apply({"params": params}, ids_N[None], None, position_ids_BxT=positions_N[None], attend=attend)
    S = offsets_S.shape[0]
    total_SxD = jax.ops.segment_sum(h_1xNxD[0].astype(jnp.float32), segments_N, num_segments=S)
    return total_SxD / jnp.maximum(lengths_S, 1).astype(jnp.float32)[:, None]


def init_fn(cfg: BertConfig, dtype=jnp.float32) -> Callable[[jax.Array], Any]:
    """``rng -> boxed params`` (with logical axis metadata), for ``mesh.abstract_params`` / ``init_sharded``."""
    model = BertEncoder(cfg, dtype=dtype, param_dtype=dtype)
    ids_1x1 = jnp.zeros((1, 1), jnp.int32)
    return lambda rng: model.init(rng, ids_1x1, jnp.ones((1, 1), jnp.int32))["params"]


# ----------------------------------------------------------------------------------------------------
# Hugging Face layout
# ----------------------------------------------------------------------------------------------------

_PREFIXES = ("", "bert.")
# Tensors of BertModel / BertFor{PreTraining,MaskedLM} that mean pooling does not use, named exactly.
_UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids", "embeddings.token_type_ids")
_UNUSED_HEADS = ("cls.predictions.", "cls.seq_relationship.")


def hf_weight_map(cfg: BertConfig, prefix: str = "") -> dict[tuple[str, ...], hf.WeightSpec]:
    """Our param path -> HF tensor. ``prefix`` is ``''`` (BertModel, contriever, MiniLM) or ``'bert.'``."""
    if prefix not in _PREFIXES:
        raise ValueError(f"prefix must be one of {_PREFIXES}, got {prefix!r}")
    p, T = prefix, (1, 0)  # torch Linear stores [out, in]; flax Dense kernels are [in, out]
    wm = {("word", "embedding"): hf.WeightSpec(f"{p}embeddings.word_embeddings.weight"),
          ("position", "embedding"): hf.WeightSpec(f"{p}embeddings.position_embeddings.weight"),
          ("token_type", "embedding"): hf.WeightSpec(f"{p}embeddings.token_type_embeddings.weight"),
          ("embed_ln", "scale"): hf.WeightSpec(f"{p}embeddings.LayerNorm.weight"),
          ("embed_ln", "bias"): hf.WeightSpec(f"{p}embeddings.LayerNorm.bias")}
    for i in range(cfg.num_hidden_layers):
        h = f"{p}encoder.layer.{i}."
        dense = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
        for ours, theirs in dense.items():
            wm[(f"layer_{i}", ours, "kernel")] = hf.WeightSpec(f"{h}{theirs}.weight", transpose=T)
            wm[(f"layer_{i}", ours, "bias")] = hf.WeightSpec(f"{h}{theirs}.bias")
        for ours, theirs in {"attn_ln": "attention.output.LayerNorm", "ffn_ln": "output.LayerNorm"}.items():
            wm[(f"layer_{i}", ours, "scale")] = hf.WeightSpec(f"{h}{theirs}.weight")
            wm[(f"layer_{i}", ours, "bias")] = hf.WeightSpec(f"{h}{theirs}.bias")
    return wm


def checkpoint_prefix(ckpt: hf.SafetensorsDir) -> str:
    """``''`` or ``'bert.'``, whichever the checkpoint's word embeddings are stored under."""
    found = [p for p in _PREFIXES if f"{p}embeddings.word_embeddings.weight" in ckpt]
    if len(found) != 1:
        raise hf.CheckpointError(
            f"{ckpt.directory}: expected exactly one of "
            f"{[p + 'embeddings.word_embeddings.weight' for p in _PREFIXES]}, found {found or 'neither'} "
            f"(is this a BERT checkpoint?)")
    return found[0]


def _ignored(prefix: str) -> Callable[[str], bool]:
    unused = {prefix + n for n in _UNUSED}
    return lambda name: name in unused or (prefix == "bert." and name.startswith(_UNUSED_HEADS))


def load_pretrained(path: str, *, mesh=None, rules=None, dtype=jnp.float32):
    """``(BertConfig, params)`` from a Hugging Face BERT directory (config.json + safetensors).

    Every parameter must be present with its shape; every checkpoint tensor must be used, except the
    pooler, the ``position_ids`` / ``token_type_ids`` buffers and (``bert.``-prefixed checkpoints) the
    pretraining heads ``cls.*``. With ``mesh``, params are built directly into their shardings.
    """
    cfg = BertConfig.from_hf(hf.read_config(path), os.path.join(path, "config.json"))
    ckpt = hf.SafetensorsDir(path)
    prefix = checkpoint_prefix(ckpt)
    abstract, specs = mesh_lib.abstract_params(init_fn(cfg, dtype))
    shardings = None
    if mesh is not None:
        shardings = mesh_lib.logical_shardings(specs, mesh, rules if rules is not None else mesh_lib.DEFAULT_RULES)
    params = hf.load_params(ckpt, hf_weight_map(cfg, prefix), abstract, shardings, ignore=_ignored(prefix))
    return cfg, params
