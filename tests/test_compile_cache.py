"""The persistent compilation cache: where it lives, and processes sharing it (concurrently, then warm)."""
import json
import os
import pathlib
import subprocess
import sys

from rre_jax import compile_cache

REPO = pathlib.Path(__file__).resolve().parents[1]

# A child process: turn the cache on (as every command does), compile and run one program, report the cache hits.
_CHILD = """
import json, sys
import jax, jax.numpy as jnp
from rre_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e.endswith("/cache_hits") else None)
path = compile_cache.enable()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache this small program too
def f(x):
    for _ in range(8):
        x = jnp.tanh(x @ x.T) + jnp.cumsum(x, 0)
    return x
y = jax.jit(f)(jnp.arange(64.0).reshape(8, 8) / 64)
print(json.dumps({"dir": path, "hits": len(hits), "y": float(y.sum())}))
"""


def test_directory_choice(monkeypatch, tmp_path):
    """An explicit directory, else RRE_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/rre_jax/...; 'off' is off."""
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve() == str(tmp_path / "xdg" / "rre_jax" / "jax_compilation_cache")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve() == str(tmp_path / "env")
    assert compile_cache.resolve(str(tmp_path / "arg")) == str(tmp_path / "arg")
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve() == ""
    assert compile_cache.resolve("OFF") == ""


def test_processes_share_the_cache(tmp_path):
    """Two processes compile the same program at once into one directory; a third loads it from there instead
    of compiling, and every process computes the same result."""
    env = {**os.environ, compile_cache.ENV_VAR: str(tmp_path / "cache"), "PYTHONPATH": str(REPO),
           "JAX_PLATFORMS": "cpu"}
    run = lambda: subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, text=True)  # noqa: E731
    first = [run(), run()]
    outs = [json.loads(p.communicate(timeout=600)[0].splitlines()[-1]) for p in first]
    assert all(p.returncode == 0 for p in first)
    assert any(name.endswith("-cache") for name in os.listdir(tmp_path / "cache")), "nothing was written"
    third = run()
    warm = json.loads(third.communicate(timeout=600)[0].splitlines()[-1])
    assert third.returncode == 0 and warm["dir"] == str(tmp_path / "cache")
    assert warm["hits"] >= 1, "the third process compiled instead of loading from the cache"
    assert {o["y"] for o in outs + [warm]} == {warm["y"]}
