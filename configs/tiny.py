"""Tiny end-to-end run (see rre_jax/configs/tiny.py).

Usage: --config configs/tiny.py[:<reward preset>][,ppo|grpo|rloo]."""
from rre_jax.configs.tiny import get_config  # noqa: F401
