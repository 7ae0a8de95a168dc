"""Token sampling: temperature, top-k and top-p (nucleus) exactly as transformers' logits warpers.

Shapes: ``B`` batch, ``V`` vocabulary. ``SamplingConfig`` is the frozen, validated form of
``config.sampling``; ``filter_logits`` is the pure function applied at every decode step.

Order and semantics follow ``transformers`` generation: temperature, then top-k (``k = 0`` disables),
then top-p (``p = 1`` disables; drop the tokens whose ascending cumulative probability is ``<= 1 - p``,
always keeping the most likely one). Filtered logits are ``-inf``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rre_jax import backend


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 512
    greedy: bool = False

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0 (got {self.temperature}); use greedy=True instead")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"sampling.max_new_tokens must be positive, got {self.max_new_tokens}")

    @classmethod
    def from_config(cls, c) -> "SamplingConfig":
        return cls(temperature=float(c.temperature), top_k=int(c.top_k), top_p=float(c.top_p),
                   max_new_tokens=int(c.max_new_tokens), greedy=bool(c.get("greedy", False)))


def filter_logits(logits_BxV, cfg: SamplingConfig):
    """Temperature-scaled logits with top-k / top-p filtered entries set to ``-inf`` (float32)."""
    logits_BxV = logits_BxV.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, logits_BxV.shape[-1])
        kth_B1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
    if cfg.top_p < 1.0:
        order_BxV = jnp.argsort(logits_BxV, axis=-1)  # ascending, like transformers
        sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
        cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
        remove_sorted = cum_BxV <= (1.0 - cfg.top_p)
        remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least the most likely token
        remove_BxV = jnp.zeros_like(remove_sorted).at[jnp.arange(logits_BxV.shape[0])[:, None],
                                                       order_BxV].set(remove_sorted)
        logits_BxV = jnp.where(remove_BxV, -jnp.inf, logits_BxV)
    return logits_BxV


def sample(rng, logits_BxV, cfg: SamplingConfig):
    """Next tokens ``int32[B]`` (argmax when ``cfg.greedy``).

    Sampling is ``jax.random.categorical`` spelled out -- the argmax of ``gumbel(rng) + logits`` -- with
    the exact ``backend.argmax``: the same key gives the same tokens, bit for bit.
    """
    if cfg.greedy:
        return backend.argmax(logits_BxV)
    logits_BxV = filter_logits(logits_BxV, cfg)
    return backend.argmax(jax.random.gumbel(rng, logits_BxV.shape, logits_BxV.dtype) + logits_BxV)
