"""Full-state checkpoints: sharded restore, resume metadata, a kill during a write, damaged steps, a full disk."""
import atexit
import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rre_jax import checkpoint, errors, mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(mesh):
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("fsdp", "tensor")))
    return {"params": {"w": w}, "beta": jnp.float32(0.2), "rng": jax.random.key_data(jax.random.key(3)),
            "step": jnp.int32(7)}


def test_save_restore_into_other_sharding(tmp_path):
    mesh8 = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(2, 2, 2)))
    state = _state(mesh8)
    mngr = checkpoint.CheckpointManager(str(tmp_path))
    mngr.save(5, state, {"step": 5, "data": {"epoch": 1, "position": 3}})
    assert mngr.all_steps() == [5]
    # Restore onto a 1-device layout: the target's shardings decide the placement.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)
    restored, meta = checkpoint.CheckpointManager(str(tmp_path)).restore(5, target)
    assert meta == {"step": 5, "data": {"epoch": 1, "position": 3}}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored["params"]["w"].sharding == one
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 6"):
        mngr.restore(6, target)


_WRITER = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from rre_jax import checkpoint
    mngr = checkpoint.CheckpointManager(sys.argv[1])
    mngr.save(1, {"w": jnp.ones((4, 4))}, {"step": 1})
    print("saved-1", flush=True)
    big = {f"w{i}": jnp.full((1024, 1024), float(i)) for i in range(256)}  # ~1 GiB: slow to write
    mngr.save(2, big, {"step": 2})
    print("saved-2", flush=True)
""")


def test_kill_during_write_keeps_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert proc.stdout.readline().strip() == "saved-1"
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any("tmp" in p.name for p in ckpt_dir.iterdir()):
        time.sleep(0.01)
    assert any("tmp" in p.name for p in ckpt_dir.iterdir()), "writer never started step 2"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mngr = checkpoint.CheckpointManager(str(tmp_path))
    assert mngr.latest_step() == 1
    state, meta = mngr.restore(1, {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((4, 4)))
    assert meta["step"] == 1
    assert not any("tmp" in p.name for p in ckpt_dir.iterdir()), "incomplete step left behind"


def _two_steps(tmp_path):
    """Steps 5 and 10 of a small state saved in ``tmp_path``; returns (manager, state)."""
    state = {"w": jnp.arange(100_000, dtype=jnp.float32), "b": jnp.ones((64, 64))}
    mngr = checkpoint.CheckpointManager(str(tmp_path))
    mngr.save(5, state, {"step": 5})
    mngr.save(10, jax.tree.map(lambda x: x + 1, state), {"step": 10})
    return mngr, state


def cut_largest_data_file(step_dir) -> str:
    """Truncate the largest file of a saved step to half its length (a failing disk, a bad copy); its path."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    path = max(files, key=os.path.getsize)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    return path


def test_a_damaged_newest_step_is_moved_aside_and_the_previous_restored(tmp_path, caplog):
    mngr, state = _two_steps(tmp_path)
    cut = cut_largest_data_file(tmp_path / "checkpoints" / "10")
    with pytest.raises(checkpoint.DamagedCheckpoint, match=f"checkpoint step 10 is damaged: {cut}: OUT_OF_RANGE"):
        mngr.restore(10, state)  # one line: the step and the file
    with caplog.at_level("WARNING"):
        step, restored, meta = mngr.restore_newest_intact(state)
    assert (step, meta) == (5, {"step": 5})
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    aside = tmp_path / "checkpoints" / "damaged" / "10"
    assert warnings == [f"checkpoint step 10 is damaged: {cut}: " + warnings[0].split(f"{cut}: ", 1)[1]]
    assert warnings[0].endswith(f"; moved to {aside}, resuming from step 5")
    assert mngr.all_steps() == [5] and os.path.exists(cut.replace("/checkpoints/10/", "/checkpoints/damaged/10/"))
    mngr.save(10, state, {"step": 10})  # the step can be written again; the damaged copy stays
    assert mngr.all_steps() == [5, 10] and aside.is_dir()


def test_late_errors_of_a_damaged_restore_stay_off_the_console(tmp_path, monkeypatch):
    """After a damaged step, a read orbax abandoned that finishes once its event loop has closed raises where
    nobody can catch it ("Event loop is closed", printed as a traceback at random moments of the resumed run):
    that one is dropped, every other unraisable exception still reaches the hook that was there."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    mngr, state = _two_steps(tmp_path)
    cut_largest_data_file(tmp_path / "checkpoints" / "10")
    with pytest.raises(checkpoint.DamagedCheckpoint):
        mngr.restore(10, state)
    unraisable = lambda e: types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=None,  # noqa: E731
                                                 err_msg=None, object=None)
    late, other = unraisable(RuntimeError("Event loop is closed")), unraisable(ValueError("a real one"))
    collected = unraisable(Exception("Encountered error while reading array index"))
    collected.object = types.SimpleNamespace(cr_code=types.SimpleNamespace(
        co_filename="/venv/orbax/checkpoint/_src/serialization/serialization.py"))  # a read coroutine of orbax's
    for u in (late, other, collected):
        sys.unraisablehook(u)
    assert seen == [other]
    absl = logging.getLogger("absl")  # orbax's own late error log of such a read: to the log file, at INFO
    record = absl.makeRecord("absl", logging.ERROR, "/x/orbax/checkpoint/serialization.py", 1, "read failed", (), None)
    assert all(f.filter(record) for f in absl.filters) and record.levelno == logging.INFO
    for f in [f for f in absl.filters if type(f).__name__ == "_OrbaxLateErrors"]:
        absl.removeFilter(f)  # this process goes on to other tests


def test_no_intact_step_is_one_error_and_moves_nothing(tmp_path):
    mngr, state = _two_steps(tmp_path)
    for step in ("5", "10"):
        cut_largest_data_file(tmp_path / "checkpoints" / step)
    with pytest.raises(errors.UserError, match="no intact checkpoint in .*step 10 is damaged.*step 5 is damaged.*"
                                               "nothing was moved"):
        mngr.restore_newest_intact(state)
    assert mngr.all_steps() == [5, 10] and not (tmp_path / "checkpoints" / "damaged").exists()


def test_a_damaged_meta_is_damage_too(tmp_path):
    mngr, state = _two_steps(tmp_path)
    meta = tmp_path / "checkpoints" / "10" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:3])
    assert mngr.newest_meta() == (5, {"step": 5})
    with pytest.raises(checkpoint.DamagedCheckpoint, match=f"step 10 is damaged: {meta}: "):
        mngr.restore(10, state)


def test_a_target_that_does_not_fit_is_not_damage(tmp_path):
    mngr, state = _two_steps(tmp_path)
    with pytest.raises(ValueError, match="not compatible with the stored shape") as e:
        mngr.restore_newest_intact({**state, "w": jnp.zeros(10)})
    assert not isinstance(e.value, checkpoint.DamagedCheckpoint)
    assert mngr.all_steps() == [5, 10]


def test_a_full_disk_is_one_error_naming_the_path_and_the_newest_intact_step(tmp_path):
    disk = small_disk(tmp_path / "disk", "1m")
    mngr = checkpoint.CheckpointManager(str(disk))
    mngr.save(1, {"w": jnp.ones(1000)}, {"step": 1})
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        mngr.save(2, {"w": jax.random.normal(jax.random.key(0), (1_000_000,))}, {"step": 2})  # 4 MB into 1 MiB
    assert e.value.errno == errno.ENOSPC and str(disk / "checkpoints" / "2") in e.value.filename
    line = checkpoint.write_failure(e.value, str(disk))
    assert line.startswith(f"could not write {e.value.filename}: No space left on device; the newest intact "
                           f"checkpoint is step 1 ({disk / 'checkpoints' / '1'})")
    assert "\n" not in line


def small_disk(path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the test (unmounted at exit); skips where mounting is not
    allowed (CI and this project's machines run as root)."""
    path.mkdir(parents=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if got.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {got.stderr.decode().strip()}")
    atexit.register(subprocess.run, ["umount", "-l", str(path)], capture_output=True)
    return path
