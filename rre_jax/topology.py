"""TPU generations and slice names: per-chip memory, peak FLOP/s and bandwidth (``CHIPS``), the topology syntax
``config.mesh.topology`` takes (``'v5e:2x4'``), and the devices of a described slice that XLA's TPU compiler
(libtpu) compiles for on any host. Below ``mesh`` (which checks topology names) and ``aot`` (which compiles for
them); it imports no other rre_jax module.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

from jax.experimental import topologies


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation, per JAX device: HBM bytes, peak bf16 FLOP/s, HBM bytes/s; the libtpu device kind,
    the ``TPU_ACCELERATOR_TYPE`` stem and ``chip_config_name`` its topology is described with."""

    hbm_gib: float
    bf16_tflops: float
    hbm_gbps: float
    kind: str
    accelerator: str
    chip_config: str = "default"


# Public per-chip figures (Google Cloud TPU documentation, "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e" pages:
# cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). v4 and v5p chips hold two TensorCores; JAX drives them as
# one device ("megacore"), so a v4 topology is described with chip_config_name='megacore': one device per chip,
# and the per-device figures are the chip's. v5e and v6e chips have one TensorCore.
CHIPS = {
    "v4": Chip(32, 275, 1228, "TPU v4", "v4", "megacore"),
    "v5e": Chip(16, 197, 819, "TPU v5 lite", "v5litepod"),
    "v5p": Chip(95, 459, 2765, "TPU v5", "v5p", "megacore"),
    "v6e": Chip(32, 918, 1640, "TPU v6 lite", "v6e"),
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``'v5e:2x4'`` -> ``('v5e', (2, 4))``; a clear error naming ``config.mesh.topology`` otherwise."""
    m = _TOPOLOGY.match(name)
    if not m:
        raise ValueError(f"config.mesh.topology={name!r}: give '<generation>:<chips per axis>' with generation "
                         f"one of {sorted(CHIPS)}, e.g. 'v5e:2x4' (v5e-8), 'v5e:4x8' (v5e-32), 'v4:2x2x1' "
                         "(v4-8), 'v4:2x2x4' (v4-32); empty: the local devices")
    return m.group(1), tuple(int(g) for g in m.groups()[1:] if g)


# Devices per host in the slices XLA's TPU compiler describes (``topology_devices``: process indices of v4, v5e,
# v5p and v6e topologies from 4 to 32 devices): 4 for every generation listed in ``CHIPS``.
DEVICES_PER_HOST = 4


def hosts(name: str) -> int:
    """Hosts of TPU topology ``name`` as the compiler describes it (``'v5e:4x8'`` -> 8; one host up to 4 devices)."""
    _, dims = parse_topology(name)
    return max(1, math.prod(dims) // DEVICES_PER_HOST)


def quiet_libtpu(gen: str, chips: int) -> None:
    """libtpu reads the TPU VM's metadata at start-up and warns when there is none (a CPU host): name the
    accelerator and a single local worker, unless the environment already does (a real TPU VM). Compiling
    for a described topology needs no chip, so the lock libtpu takes against a second process is lifted (a
    compile-only run beside a training run, or two of them, on one host)."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{CHIPS[gen].accelerator}-{chips}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(name: str) -> list:
    """The devices of TPU topology ``name`` (descriptions only: compile for them, never run)."""
    gen, dims = parse_topology(name)
    quiet_libtpu(gen, math.prod(dims))
    topo = topologies.get_topology_desc(topology_name=f"{gen}:{'x'.join(map(str, dims))}", platform="tpu",
                                        chip_config_name=CHIPS[gen].chip_config)
    return list(topo.devices)


def chip_of(devices) -> Chip | None:
    """The `Chip` of ``devices`` (None: not a TPU generation listed here)."""
    kind = devices[0].device_kind
    return next((c for c in CHIPS.values() if c.kind == kind), None)
