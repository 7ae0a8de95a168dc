"""The shipped run configs, in one folder: ``get_config(arg)`` files (big_vision style) and their shared helpers.

    configs/defaults.py         every field a run reads, with the paper's settings (``base_config``), and the
                                shared helpers of the config files (``plan_section``, ``tiny_model_config``)
    configs/tiny.py             the tiny end-to-end run (``--config configs/tiny.py[:<preset>][,<algorithm>]``)
    configs/alpacafarm_rer.py   the paper's setting (``--config configs/alpacafarm_rer.py:rer,v4-32``)

This folder is the package ``rre_jax.configs`` too (``rre_jax/configs`` links here), so the wheel ships it and
``--config tiny`` works from an installed package: ``names()`` and ``path(name)`` find the files of either.
"""
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
_NOT_CONFIGS = {"defaults"}  # modules of this folder that are helpers, not run configs


def names() -> list[str]:
    """The shipped configs' names."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and not f.startswith("_") and f[:-3] not in _NOT_CONFIGS)


def path(name: str) -> str:
    """Absolute path of a shipped config file, e.g. ``path('tiny')``."""
    if name not in names():
        raise FileNotFoundError(f"no shipped config {name!r}; available: {names()}")
    return os.path.join(CONFIG_DIR, f"{name}.py")
