"""The JAX platform a command starts on, chosen from the hardware present before JAX initialises its backends.

With libtpu installed (the ``test`` and ``tpu`` extras, or a runtime image that ships it), JAX tries the TPU
backend first wherever it runs; on a machine without a TPU, libtpu then prints its start-up errors (``Failed to
find host bounds``, ``INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES``) before every command. `choose` looks for what
libtpu and the CUDA / ROCm plugins would use -- a Google TPU on the PCI bus (vendor 0x1ae0, as
``jax._src.hardware_utils`` finds it), ``/dev/accel*`` or ``/dev/vfio/<n>`` devices, NVIDIA or AMD device files --
and, when there is none, sets ``JAX_PLATFORMS=cpu``, so no backend is probed that cannot start. A user's own
``JAX_PLATFORMS`` (set, even empty) always wins, and on a machine with an accelerator nothing is set.

Compiling for a described TPU topology (``--compile_only``) needs libtpu, not the TPU backend, and works with
``JAX_PLATFORMS=cpu``.
"""
from __future__ import annotations

import glob
import os
import sys

ENV_VAR = "JAX_PLATFORMS"
_GOOGLE_PCI_VENDOR = "0x1ae0"
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*",  # TPU v2-v4 / v5e and later
                      "/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg",  # NVIDIA (a container, WSL2)
                      "/dev/kfd")  # AMD ROCm


def accelerator_present() -> bool:
    """A TPU, GPU or their device files on this machine (what JAX's TPU, CUDA and ROCm backends look for)."""
    if any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def choose(environ=os.environ) -> str | None:
    """Set ``JAX_PLATFORMS=cpu`` in ``environ`` when the user chose no platform and no accelerator is present;
    returns what was set (None: nothing). Call it before JAX starts its backends."""
    if ENV_VAR in environ or accelerator_present():
        return None
    environ[ENV_VAR] = "cpu"
    jax = sys.modules.get("jax")
    if jax is not None and not jax.config.jax_platforms:  # imported already: the flag was read at import time
        jax.config.update("jax_platforms", "cpu")
    return "cpu"
