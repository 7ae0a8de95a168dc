"""Shipped run configs (``get_config(arg)`` files, big_vision style).

They live in the package so an installed wheel can run them; the top-level ``configs/`` directory of the
repository holds thin files with the same names for ``--config configs/<name>.py[:arg]``.
"""
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
_NOT_CONFIGS = {"loader"}  # modules of this package that are not run configs


def names() -> list[str]:
    """The shipped configs' names."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and not f.startswith("_") and f[:-3] not in _NOT_CONFIGS)


def path(name: str) -> str:
    """Absolute path of a shipped config file, e.g. ``path('tiny')``."""
    if name not in names():
        raise FileNotFoundError(f"no shipped config {name!r}; available: {names()}")
    return os.path.join(CONFIG_DIR, f"{name}.py")
