"""LoRA adapters as a separate, pure-functional parameter tree (PEFT semantics).

For a target projection ``y = x W`` the adapter adds ``scale * dropout(x) A B`` with ``A: (in, R)``,
``B: (R, out)``, ``scale = alpha / R``. ``A`` is initialised like PEFT (kaiming-uniform with
``a = sqrt(5)``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``) and ``B`` to zero, so a fresh adapter leaves the
model unchanged. The tree mirrors the scanned Llama layers: ``{'layers': {target: {'a': (L, in, R),
'b': (L, R, out)}}}``; the base params are never touched (the policy's reference model is the same
base with ``lora=None``). ``merge`` folds the adapters into the base weights for export.

Letters: L layers, R rank, N tokens (any leading shape).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha (scale = alpha / rank), dropout on the adapter input, and the target projections."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoraConfig.targets {self.targets!r}: unknown {bad}; choose from {TARGETS}")

    @classmethod
    def from_config(cls, section) -> "LoraConfig":
        """From a run config's ``model.lora`` section (the one place a run builds its LoRA config)."""
        try:
            return cls(rank=int(section.rank), alpha=float(section.alpha), dropout=float(section.dropout),
                       targets=tuple(section.targets))
        except ValueError as e:
            raise ValueError(f"config.model.lora: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _dims(cfg) -> dict[str, tuple[int, int, str, str]]:
    """(in, out, in logical name, out logical name) of each projection of a ``LlamaConfig``."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    HE, KE = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (D, HE, "embed", "heads"), "k_proj": (D, KE, "embed", "kv_heads"),
            "v_proj": (D, KE, "embed", "kv_heads"), "o_proj": (HE, D, "heads", "embed"),
            "gate_proj": (D, F, "embed", "mlp"), "up_proj": (D, F, "embed", "mlp"),
            "down_proj": (F, D, "mlp", "embed")}


def init(cfg, lora_cfg: LoraConfig, rng, dtype=jnp.float32):
    """Fresh adapters for a ``LlamaConfig``: A kaiming-uniform (PEFT), B zeros."""
    L, R, dims = cfg.num_hidden_layers, lora_cfg.rank, _dims(cfg)
    out = {}
    for t, key in zip(lora_cfg.targets, jax.random.split(rng, len(lora_cfg.targets))):
        d_in, d_out = dims[t][:2]
        bound = 1.0 / d_in ** 0.5
        out[t] = {"a": jax.random.uniform(key, (L, d_in, R), dtype, -bound, bound),
                  "b": jnp.zeros((L, R, d_out), dtype)}
    return {"layers": out}


def logical_specs(cfg, lora_cfg: LoraConfig):
    """Logical PartitionSpecs of the adapter tree (for ``rre_jax.mesh.logical_shardings``)."""
    dims = _dims(cfg)
    return {"layers": {t: {"a": P("layers", dims[t][2], "lora"), "b": P("layers", "lora", dims[t][3])}
                       for t in lora_cfg.targets}}


def delta(x_NxI, adapter, lora_cfg: LoraConfig, rng=None):
    """``scale * dropout(x) @ a @ b`` for one layer's adapter ``{'a': (I, R), 'b': (R, O)}``."""
    if rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - lora_cfg.dropout, x_NxI.shape)
        x_NxI = jnp.where(keep, x_NxI / (1.0 - lora_cfg.dropout), 0).astype(x_NxI.dtype)
    a, b = adapter["a"].astype(x_NxI.dtype), adapter["b"].astype(x_NxI.dtype)
    return (x_NxI @ a) @ b * jnp.asarray(lora_cfg.scale, x_NxI.dtype)


def merge(params, lora, lora_cfg: LoraConfig):
    """Base params with ``W + scale * A B`` folded into every target kernel (same dtypes)."""
    layers = dict(params["layers"])
    for t, ad in lora["layers"].items():
        w = layers[t]["kernel"]
        d = jnp.einsum("lir,lro->lio", ad["a"].astype(jnp.float32), ad["b"].astype(jnp.float32)) * lora_cfg.scale
        layers[t] = {**layers[t], "kernel": (w.astype(jnp.float32) + d).astype(w.dtype)}
    return {**params, "layers": layers}
