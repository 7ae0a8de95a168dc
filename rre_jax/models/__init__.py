"""Pure-functional Flax models (Llama family, BERT), LoRA adapters and Hugging Face checkpoint I/O.

``from_pretrained(path)`` reads a transformers directory (config.json + safetensors) and tells what it
is: ``causal_lm`` (Llama / Mistral / Qwen2 with ``lm_head`` or tied embeddings), ``seq_cls`` (HF
``LlamaForSequenceClassification``, ``score.weight``), ``starling`` (Starling-RM: ``transformer.*`` +
``v_head.weight``) or ``bert`` (the relevance encoder, loaded by ``rre_jax.models.bert``).
``causal_lm_logits`` and ``sequence_scores`` are the jitted forwards for those kinds.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from rre_jax import mesh as mesh_lib
from rre_jax.models import bert, hf, llama
from rre_jax.models.llama import LlamaConfig


class Pretrained(NamedTuple):
    """A loaded checkpoint: ``kind`` (causal_lm / seq_cls / starling / bert), its config and params."""

    kind: str
    config: Any
    params: Any


def from_pretrained(path: str, *, mesh=None, rules=mesh_lib.DEFAULT_RULES, dtype=jnp.float32,
                    param_dtype=None, layer_layout: str = "stacked") -> Pretrained:
    """Load an HF directory into (kind, config, params), each tensor streamed into its target sharding.

    ``dtype`` is the compute dtype; ``param_dtype`` (default: ``dtype``) the stored one. Llama-family
    ``layer_layout``: ``'stacked'`` (training) or ``'per_layer'`` (generation: no per-step weight copy).
    """
    cfg = hf.read_config(path)
    if cfg.get("model_type") == "bert":
        loaded = bert.load_pretrained(path, mesh=mesh, rules=rules)
        if isinstance(loaded, tuple) and len(loaded) == 2:
            return Pretrained("bert", *loaded)
        return Pretrained("bert", getattr(loaded, "config", None), getattr(loaded, "params", loaded))
    kind, config, params = llama.load_pretrained(path, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype,
                                                 layer_layout=layer_layout)
    return Pretrained(kind, config, params)


def _config(model_or_cfg) -> tuple[LlamaConfig, str | None]:
    if isinstance(model_or_cfg, Pretrained):
        return model_or_cfg.config, model_or_cfg.kind
    if isinstance(model_or_cfg, LlamaConfig):
        return model_or_cfg, None
    raise TypeError(f"expected a Pretrained or LlamaConfig, got {type(model_or_cfg).__name__}")


def causal_lm_logits(model_or_cfg, params, input_ids, attention_mask):
    """Logits ``BxTxV`` (float32) of a causal LM for a (left- or right-) padded batch.

    Pad positions get RoPE position 0 and are masked as keys; their own logits are meaningless.
    """
    cfg, kind = _config(model_or_cfg)
    if kind not in (None, "causal_lm"):
        raise ValueError(f"causal_lm_logits needs a causal LM checkpoint, this one is {kind!r}")
    return llama.forward(cfg, params, jnp.asarray(input_ids, jnp.int32),
                         jnp.asarray(attention_mask, jnp.int32), head="lm")["logits"]


def sequence_scores(model_or_cfg, params, input_ids, attention_mask, layout: str | None = None):
    """Reward-model scores ``BxC`` (C = num_labels; Starling C = 1).

    ``seq_cls``: score at each row's last real token by ``attention_mask`` (HF
    ``LlamaForSequenceClassification``). ``starling``: score at the position before the first PAD id 0
    (Starling-RM-34B's reference class). ``layout`` defaults to the loaded checkpoint's kind.
    """
    cfg, kind = _config(model_or_cfg)
    layout = layout or kind
    if layout not in ("seq_cls", "starling"):
        raise ValueError(f"sequence_scores: layout must be 'seq_cls' or 'starling', got {layout!r}")
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.asarray(attention_mask, jnp.int32)
    scores_BxTxC = llama.forward(cfg, params, ids, mask, head="score")["scores"]
    if layout == "seq_cls":
        return llama.pool_last_real(scores_BxTxC, mask)
    return llama.pool_before_first_pad(scores_BxTxC, ids, 0)


__all__ = ["LlamaConfig", "Pretrained", "from_pretrained", "causal_lm_logits", "sequence_scores"]
