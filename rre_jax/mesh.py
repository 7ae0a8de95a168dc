"""One global device mesh, logical axis rules, and shardings of parameters.

Every model in rre_jax names the axes of its parameters and main activations with *logical* names
(``LOGICAL_AXES``). A rules list, held in the config, maps each logical name to a mesh axis of
``('data', 'fsdp', 'tensor')`` or to ``None`` (replicated). A logical name that no rule mentions is an
error, never a silent replication: adding a parameter means adding (or reusing) a rule.

Parameters are initialised *already sharded*: ``jax.eval_shape`` gives the abstract tree with its
logical specs, the rules turn those into ``NamedSharding``s, and one jitted init writes every shard
where it belongs. ``param_bytes_per_device`` does the same bookkeeping without allocating anything.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.experimental import mesh_utils

from rre_jax import topology

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by the models.
#   batch, length: activations;  embed: d_model;  mlp: FFN hidden;  heads / kv_heads: fused
#   (heads x head_dim) projection outputs;  vocab: vocabulary;  norm: 1-D scales and biases;
#   layers: stacked-layer axis (scan);  lora: the LoRA rank;  cache_*: KV-cache axes.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("lora", None),
    ("classes", None),
    ("position", None),  # rows of BERT's absolute-position embedding table
    ("token_type", None),  # rows of BERT's token-type embedding table
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_heads", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the ``('data', 'fsdp', 'tensor')`` mesh and the logical -> mesh rules.

    A shape entry of -1 takes all remaining devices (at most one -1). ``num_devices`` > 0 uses only the
    first that many devices (e.g. a 1-device run on an 8-device host); 0 uses all.
    """

    shape: tuple[int, int, int] = (-1, 1, 1)
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
    num_devices: int = 0
    topology: str = ""  # the TPU slice the mesh is for, e.g. 'v5e:2x4' (rre_jax.aot); compile-only runs use it

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3:
            raise ValueError(f"mesh.shape must have 3 entries for axes {MESH_AXES}, got {self.shape!r}")
        if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
            raise ValueError(f"mesh.shape {self.shape!r}: entries must be positive, with at most one -1")
        object.__setattr__(self, "shape", shape)
        rules = tuple((str(name), _canon_axes(axes)) for name, axes in self.rules)
        for name, axes in rules:
            for a in axes or ():
                if a not in MESH_AXES:
                    raise ValueError(f"mesh.rules: logical axis {name!r} maps to unknown mesh axis {a!r}; "
                                     f"mesh axes are {MESH_AXES}")
        object.__setattr__(self, "rules", rules)
        if self.topology:
            topology.parse_topology(self.topology)  # the known TPU generations and the name syntax

    @classmethod
    def from_config(cls, cfg) -> "MeshConfig":
        """From an ml-collections section with fields ``shape`` and (optionally) ``rules``."""
        rules = cfg.get("rules", None)
        return cls(shape=tuple(cfg.shape), rules=tuple(tuple(r) for r in rules) if rules else DEFAULT_RULES,
                   num_devices=int(cfg.get("num_devices", 0)), topology=str(cfg.get("topology", "")))

    def resolved_shape(self, num_devices: int) -> tuple[int, int, int]:
        shape = list(self.shape)
        known = math.prod(s for s in shape if s != -1)
        if -1 in shape:
            if num_devices % known:
                raise ValueError(f"mesh.shape {self.shape!r} does not divide {num_devices} devices")
            shape[shape.index(-1)] = num_devices // known
        if math.prod(shape) != num_devices:
            raise ValueError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices but "
                             f"{num_devices} are available; set --config.mesh.shape to fit, e.g. (-1, 1, 1)")
        return tuple(shape)


def _canon_axes(axes):
    if axes is None:
        return None
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The global mesh with axes ``('data', 'fsdp', 'tensor')`` over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolved_shape(len(devices))
    try:  # an order that follows the physical links (TPU torus); CPU and GPU devices come back in plain order
        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
        log.warning("config.mesh.shape=%s over %d %s devices does not map onto their physical topology (%s: %s); "
                    "the mesh uses plain device order, whose collectives may cross slower links. Choose a shape "
                    "that tiles the slice (the TPU presets of configs/alpacafarm_rer.py do) or use every device "
                    "(config.mesh.num_devices=0)", tuple(shape), len(devices), devices[0].platform,
                    type(e).__name__, e)
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_mesh_spec(logical: Sequence[str | None], rules) -> P:
    """PartitionSpec for one array's logical axes. Unknown logical names are an error."""
    table = dict(rules)
    out, used = [], set()
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add ({name!r}, <mesh axis or None>) "
                           f"to config.mesh.rules")
        axes = tuple(a for a in (_canon_axes(table[name]) or ()) if a not in used)  # a mesh axis shards one dim only
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def decode_rules(rules):
    """The rules of the decode step: the activations' ``batch`` on the batch axes that do not also shard the
    weights' ``embed`` dimension (``fsdp``). A decode step moves one token per row, so XLA then keeps every weight
    where it lies and reduces partial sums of the small activations over ``fsdp``, instead of gathering each
    layer's weights at every step (on v5e-8: 2.93 GiB of sampler temporaries instead of 7.53, docs/tpu_compile.md).
    Rules without an ``embed`` or ``batch`` entry are returned as they are."""
    table = dict(rules)
    if "batch" not in table or "embed" not in table:
        return rules
    embed = set(_canon_axes(table["embed"]) or ())
    batch = tuple(a for a in (_canon_axes(table["batch"]) or ()) if a not in embed)
    return tuple((n, (batch or None) if n == "batch" else a) for n, a in rules)


def logical_shardings(logical_specs, mesh: Mesh, rules):
    """Map a pytree of logical PartitionSpecs (from ``nn.get_partition_spec``) to NamedShardings."""
    def one(spec):
        return NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), rules))
    return jax.tree.map(one, logical_specs, is_leaf=lambda x: isinstance(x, P))


def abstract_params(init_fn: Callable[[jax.Array], Any], rng=None):
    """(abstract unboxed params, logical specs) of ``init_fn(rng)`` without allocating anything."""
    rng = jax.random.key(0) if rng is None else rng
    boxed = jax.eval_shape(init_fn, rng)
    specs = nn.get_partition_spec(boxed)
    return nn.meta.unbox(boxed), specs


def init_sharded(init_fn: Callable[[jax.Array], Any], rng, mesh: Mesh, rules):
    """Initialise params directly into their shardings; returns (params, shardings)."""
    abstract, specs = abstract_params(init_fn, rng)
    shardings = logical_shardings(specs, mesh, rules)
    params = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return params, shardings


def bytes_per_device(abstract_tree, logical_specs, mesh_shape: dict[str, int], rules) -> int:
    """Bytes one device holds for ``abstract_tree`` on a mesh of ``mesh_shape`` (no devices needed).

    Dimensions split unevenly are rounded up, as XLA pads them.
    """
    total = 0
    specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
    for leaf, spec in zip(jax.tree.leaves(abstract_tree), specs):
        mesh_spec = logical_to_mesh_spec(tuple(spec), rules)
        shape = list(leaf.shape)
        for i, axes in enumerate(mesh_spec):
            for a in _canon_axes(axes) or ():
                shape[i] = -(-shape[i] // mesh_shape[a])
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
