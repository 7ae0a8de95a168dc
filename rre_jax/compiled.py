"""Run jitted programs compiled ahead of their first call, handing the compiler's freed memory back first.

XLA's compiler (LLVM on CPU) allocates hundreds of MB while it builds a large program such as the PPO update,
and glibc keeps those freed pages in its arenas. A plain ``jax.jit`` call compiles and then runs in one go, so
the program's own buffers land on top of the compiler's leftovers and the process peaks at both together.
``AheadOfTime`` compiles a signature first (``lower(...).compile()``), calls ``backend.release_host_memory`` and
only then runs it: the peak becomes the larger of the two, not their sum (figures: docs/benchmark_results.md).
"""
from __future__ import annotations

import jax

from rre_jax.backend import release_host_memory


def _signature(x):
    """What an executable is specialised on: shape, dtype, weak type and placement of a device array; shape
    and dtype (or only the type, for a Python scalar) of anything else."""
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding)
    return (type(x), getattr(x, "shape", None), getattr(x, "dtype", None))


def _placed(sharding, x):
    """``x`` (a leaf or a subtree) put on ``sharding``: a no-op where it already is. On a mesh that spans
    processes only global arrays are moved; a host value (a key or array every host made alike) goes in as is, and
    the executable places each host's copy on that host's devices, as ``jax.jit`` does."""
    if sharding is None:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    def one(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and leaf.sharding != sharding:
            return jax.device_put(leaf, sharding)
        return leaf
    return jax.tree.map(one, x)


class AheadOfTime:
    """A ``jax.jit``-ed function, compiled once per input signature (tree, shapes, dtypes, shardings) before
    it runs; calls then go straight to the executable. ``_cache_size()`` counts the executables (as
    ``jax.jit``'s does), so a recompilation check reads the same.

    ``in_shardings`` (those the function was jitted with): arguments are first put there (``jax.device_put``,
    a no-op for an array already in place), so an input laid out otherwise by an earlier op is resharded
    instead of rejected by the executable, and never compiles a second executable."""

    def __init__(self, jitted, in_shardings=None):
        self.jitted = jitted
        self.in_shardings = in_shardings
        self._executables: dict = {}

    def __call__(self, *args):
        if self.in_shardings is not None:
            args = jax.tree.map(_placed, self.in_shardings, args,
                                is_leaf=lambda s: s is None or isinstance(s, jax.sharding.Sharding))
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple(map(_signature, leaves)))
        exe = self._executables.get(key)
        if exe is None:
            exe = self._executables[key] = self.jitted.lower(*args).compile()
            release_host_memory()
        return exe(*args)

    def _cache_size(self) -> int:
        return len(self._executables)
