"""Quiet on CPU hosts (`rre_jax.platform`): with libtpu installed and no TPU, no command prints libtpu's start-up
errors; a user's JAX_PLATFORMS and a machine with an accelerator are left alone."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from rre_jax import platform

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBTPU_NOISE = ("Failed to find host bounds", "TPU_WORKER_HOSTNAMES", "libtpu", "TPU_ACCELERATOR_TYPE")


def test_choose_sets_cpu_only_when_nothing_is_chosen_or_present(monkeypatch):
    monkeypatch.setattr(platform, "accelerator_present", lambda: False)
    env = {}
    assert platform.choose(env) == "cpu" and env == {"JAX_PLATFORMS": "cpu"}
    for chosen in ("", "tpu", "cuda,cpu"):  # the user's choice wins, even an empty one (JAX's default)
        env = {"JAX_PLATFORMS": chosen}
        assert platform.choose(env) is None and env == {"JAX_PLATFORMS": chosen}
    monkeypatch.setattr(platform, "accelerator_present", lambda: True)
    env = {}
    assert platform.choose(env) is None and env == {}


def bare_env() -> dict:
    """This environment without JAX_PLATFORMS (conftest sets it for the test process). libtpu loads even while
    another process holds its lock file (a test worker compiling for a TPU topology): with the lock held, JAX
    skips libtpu silently, which would make a quiet command prove nothing."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return {**env, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@pytest.mark.skipif(platform.accelerator_present(), reason="this machine has an accelerator: JAX may probe it")
def test_commands_print_no_libtpu_errors_on_a_cpu_host(tmp_path):
    if importlib.util.find_spec("libtpu") is not None:  # the noise is there to be silenced: JAX alone prints it
        plain = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=bare_env(),
                               capture_output=True, text=True, cwd=tmp_path)
        assert any(n in plain.stderr for n in LIBTPU_NOISE), plain.stderr
    params = subprocess.run([sys.executable, "-m", "rre_jax.cli.params", "--model", "llama-7b", "--lora", "--mesh",
                             "1,1,1"], env=bare_env(), capture_output=True, text=True, cwd=tmp_path)
    assert params.returncode == 0 and params.stderr == "", params.stderr
    missing = tmp_path / "no_run"
    evaluation = subprocess.run([sys.executable, "-m", "rre_jax.cli.eval", "--workdir", str(missing), "--eval-set",
                                 str(tmp_path / "x.json")], env=bare_env(), capture_output=True, text=True,
                                cwd=tmp_path)
    assert evaluation.returncode == 2
    assert evaluation.stderr.splitlines() == [f"rre-eval: error: --workdir {str(missing)!r} holds no checkpoints/ "
                                              "directory; is it a run's workdir?"], evaluation.stderr
    assert not missing.exists()  # the lock it took (and the directory made for it) is gone again
