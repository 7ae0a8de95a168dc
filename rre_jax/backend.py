"""What XLA:CPU (and the glibc host heap) lack, worked around in one place.

rre_jax targets TPU first; the CPU is where its tests, benchmarks and small runs live. Each function here stands
in for a plain JAX call that is slow or wasteful on XLA:CPU, computes exactly the same values (so every backend
may use it), and says what to put back once the backend catches up:

* ``argmax``: XLA:CPU lowers ``jnp.argmax`` to a variadic (value, index) reduce that does not vectorise (~1 ms
  for 16 x 32000 per decode step, ~10x two plain reductions). Put back: ``jnp.argmax(x, -1)``.
* ``cumsum``: a long 1-D integer ``jnp.cumsum`` (~80k positions, the text features' byte stream) costs about
  twice the two-level form. Put back: ``jnp.cumsum``.
* ``materialize``: XLA fuses a cheap producer into every consumer, so a value read at shifted or gathered
  positions is re-derived at each read; TPU honours ``lax.optimization_barrier`` for that, XLA:CPU's pipeline
  drops it. Put back: ``lax.optimization_barrier`` (or nothing).
* ``release_host_memory``: glibc keeps the heap pages the compiler (LLVM, on the host for every backend) frees,
  so a process peaks at the compiler's leftovers plus the program's buffers (``programs.AheadOfTime`` calls it
  between compiling and running). Put back: nothing, where the allocator returns memory itself.

Two layout choices depend on the backend and are made once, at set-up, from ``on_xla_cpu()`` -- never by asking
``jax.default_backend()`` inside a traced function: BERT attention as a loop over blocks of one row's heads
(``bert.attention(looped=True)``; batched over all rows, XLA:CPU writes the whole ``[B, H, T, T]`` score tensor
to memory between the matmuls and each softmax pass), and relevance texts packed into streams rather than
padded rows (``relevance.RelevanceEncoder(packed=...)``). Put back: the accelerator layouts (``False``). A
third is the order of a decode step's KV-cache writes (``llama.Llama.write_cache_last``): XLA:CPU copies a cache
buffer that is read before it is updated in place, so there each layer writes its keys before it attends. Put
back: ``write_cache_last=True``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import jax
import jax.numpy as jnp


def on_xla_cpu(platform: str | None = None) -> bool:
    """True when arrays live on XLA:CPU (``platform``, default: JAX's default backend). Call it once, when a
    component is built, and hand the answer down as a parameter."""
    return (platform or jax.default_backend()) == "cpu"


def argmax(x_BxV):
    """``jnp.argmax(x, -1)`` as ``int32[B]``, exactly (first index of the maximum; a NaN wins, the first
    one), computed as a max and a min-reduce of ``where(x == max, iota, V)``."""
    V = x_BxV.shape[-1]
    max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)  # NaN if the row holds one
    hit_BxV = (x_BxV == max_Bx1) | jnp.isnan(x_BxV)
    iota_BxV = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, x_BxV.ndim - 1)
    return jnp.min(jnp.where(hit_BxV, iota_BxV, V), axis=-1)


def cumsum(x_N: jax.Array, block: int = 128) -> jax.Array:
    """Inclusive integer prefix sum of a long 1-D stream, in two levels: within blocks of ``block``, then the
    blocks' running totals added on. The same integers as ``jnp.cumsum`` (integer sums are exact, uint32
    wraps alike). The blocks' offsets are added to their first elements before the in-block scan, so the
    scan's own output is the result: one buffer, which consumers read instead of each re-adding the offsets."""
    n = x_N.shape[0]
    blocks_Kxb = jnp.pad(x_N, (0, -n % block)).reshape(-1, block)
    total_K = blocks_Kxb.sum(axis=1, dtype=x_N.dtype)
    first_Kx1 = blocks_Kxb[:, :1] + (jnp.cumsum(total_K) - total_K)[:, None]
    return jnp.cumsum(jnp.concatenate([first_Kx1, blocks_Kxb[:, 1:]], axis=1), axis=1).reshape(-1)[:n]


def materialize(x_N: jax.Array) -> jax.Array:
    """``x_N`` written to memory once (a scatter's result is always a buffer of its own), so consumers that
    read it at shifted or gathered positions do not each re-derive it."""
    n = x_N.shape[0]
    return jnp.zeros_like(x_N).at[jnp.arange(n)].set(x_N, indices_are_sorted=True, unique_indices=True)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def release_host_memory() -> bool:
    """Collect garbage and return the C heap's free pages to the OS; True when ``malloc_trim`` ran."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
