"""Test setup: 8 virtual CPU devices (set before JAX initialises) and shared fixtures.

Tests read nothing outside the repository: inputs of the kinds the paper's prompt files hold are generated
(tests/generated_prompts.py); test_stands_alone.py keeps it so."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache per test run, shared by this process and every process a test starts (they
# inherit the variable): the suite compiles each program once, and no run reads what another run left behind.
# Set RRE_JAX_COMPILATION_CACHE yourself to keep the cache between runs (or 'off').
if "RRE_JAX_COMPILATION_CACHE" not in os.environ:
    os.environ["RRE_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="rre_jax_test_compile_cache_")
    atexit.register(shutil.rmtree, os.environ["RRE_JAX_COMPILATION_CACHE"], True)

from rre_jax import compile_cache  # noqa: E402

compile_cache.enable()

import pytest  # noqa: E402

@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny tokenizer, SFT-warm-started policy and random gold RM (rre_jax.tiny_assets), built once per session
    and shared by every test that trains or evaluates the tiny config (a module may define its own ``assets``)."""
    from rre_jax import tiny_assets
    from rre_jax.configs import tiny as tiny_config
    cfg = tiny_config.get_config()
    return tiny_assets.ensure_assets(cfg, str(tmp_path_factory.mktemp("tiny_assets")))
