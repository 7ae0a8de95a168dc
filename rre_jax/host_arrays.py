"""Host <-> global batch arrays across the processes of a multi-host run.

Each host holds its share of a batch (its rows, in process order); jitted programs take global arrays sharded over
the mesh's batch axes. ``to_global`` / ``to_local`` convert between the two; ``gather`` and ``gather_texts`` give
every host the whole batch (metrics, skip decisions, dev-eval and checkpoint-eval records then agree everywhere).
On one process they are plain conversions.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from rre_jax import mesh as mesh_lib


def batch_spec(rules, ndim: int):
    """The PartitionSpec of a batch array of ``ndim`` dimensions: rows over the batch axes of ``rules``."""
    return mesh_lib.logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), rules)


def to_global(mesh, rules, x):
    """A host-local batch share -> a global array sharded over the mesh's batch axes."""
    spec = batch_spec(rules, np.ndim(x))
    return jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), np.asarray(x))


def to_local(mesh, rules, x) -> np.ndarray:
    """The inverse of ``to_global``: this host's rows of a global batch array, as NumPy (all rows on one host)."""
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, batch_spec(rules, x.ndim)))


def gather(tree):
    """Host-local batch shares -> the global batch on every host (rows in process order, as ``to_global`` lays
    them out). Metrics, skip decisions and dev-eval records then agree on every host."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def gather_texts(texts: list[str]) -> list[str]:
    """``gather`` for strings (UTF-8 bytes padded to the longest text on any host)."""
    data = [t.encode("utf-8") for t in texts]
    n_L = gather(np.array([len(b) for b in data], np.int32))
    buf = np.zeros((len(data), max(int(n_L.max(initial=0)), 1)), np.uint8)
    for i, b in enumerate(data):
        buf[i, :len(b)] = np.frombuffer(b, np.uint8)
    return [bytes(row[:n]).decode("utf-8") for row, n in zip(gather(buf), n_L)]
