"""JAX's persistent compilation cache, on by default for every rre_jax command.

XLA compiles each jitted program once per process; most of a short command's first result is that compile.
With the cache on, a compiled executable is written to a directory keyed by the program, its shardings, the
jax / jaxlib version and the backend, and the next process that needs the same program loads it instead of
compiling (CPU executables are cached as well as TPU and GPU ones).

Where: ``enable(directory)`` with ``directory`` non-empty (e.g. ``--config.compilation_cache``), else the
``RRE_JAX_COMPILATION_CACHE`` environment variable, else ``$XDG_CACHE_HOME/rre_jax/jax_compilation_cache``
(``~/.cache/...``). ``off`` (either way) leaves the cache off.

Several processes may share the directory (the hosts of a multi-host run on one machine, two commands at
once, pytest workers): the cache is given a size bound, which makes jax take a file lock around every read and
write, so no process reads an entry another is still writing; least recently used entries are evicted past
the bound. In a multi-process run only process 0 writes entries; every process reads them.
"""
from __future__ import annotations

import os

import jax

ENV_VAR = "RRE_JAX_COMPILATION_CACHE"
OFF = "off"
MAX_BYTES = 4 << 30  # least recently used entries are evicted past this
MIN_COMPILE_SECONDS = 0.2  # quicker compiles are not worth a file each


def default_directory() -> str:
    """``$XDG_CACHE_HOME/rre_jax/jax_compilation_cache`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rre_jax", "jax_compilation_cache")


def resolve(directory: str = "") -> str:
    """The directory the cache will use, or ``''`` when it is off (``directory`` > env var > default)."""
    choice = directory or os.environ.get(ENV_VAR, "") or default_directory()
    return "" if choice.strip().lower() == OFF else os.path.expanduser(choice)


def enable(directory: str = "") -> str:
    """Turn the persistent cache on (before the first compile of the process); returns its directory or ``''``.

    A directory jax already uses is kept when ``directory`` and the env var are both unset, so a caller that
    configured jax itself (a notebook, a test session) is not overridden.
    """
    current = jax.config.jax_compilation_cache_dir
    if current and not directory and not os.environ.get(ENV_VAR):
        return current
    path = resolve(directory)
    if not path:
        jax.config.update("jax_compilation_cache_dir", None)
        return ""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
