"""One workdir, one run (`rre_jax.workdir_lock`): a live holder refuses a second command, a gone one is taken over.

The holders are real processes: a Python child that takes the lock and waits, killed with SIGKILL; and a real
``rre-train`` started twice on one workdir."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from rre_jax import workdir_lock
from test_train import train_command

REPO = pathlib.Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from rre_jax import workdir_lock
with workdir_lock.hold(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(workdir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_and_a_killed_one_is_taken_over(tmp_path, caplog):
    workdir = tmp_path / "run"
    proc = start_holder(workdir)
    try:
        held = workdir_lock.read_holder(str(workdir))
        assert held.pid == proc.pid and held.command == "holder"
        with pytest.raises(workdir_lock.WorkdirLocked, match=f"in use by holder .*pid {proc.pid}.*wait for it"):
            with workdir_lock.hold(str(workdir), "second"):
                pass
        assert workdir_lock.read_holder(str(workdir)).pid == proc.pid  # the refusal changed nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (workdir / workdir_lock.LOCK_NAME).exists()  # SIGKILL leaves the lock behind
    with caplog.at_level("WARNING", logger="rre_jax.workdir_lock"):
        with workdir_lock.hold(str(workdir), "resume") as me:
            assert me.pid == os.getpid()
            with workdir_lock.hold(str(workdir), "nested"):  # the same process nests
                pass
            assert workdir_lock.read_holder(str(workdir)).token == me.token
    assert [r.message for r in caplog.records if "took over" in r.message] == [
        f"took over the lock {workdir / workdir_lock.LOCK_NAME} of holder (host {held.host}, pid {proc.pid}, "
        f"started {held.started}), which is gone (no process {proc.pid} on this host)"]
    assert not (workdir / workdir_lock.LOCK_NAME).exists()  # released at the end


def test_another_hosts_lock_is_taken_over_only_without_heartbeat(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / workdir_lock.LOCK_NAME

    def other_host(age_s):
        lock.write_text(json.dumps({"host": "tpu-vm-7", "pid": 4242, "started": "2026-12-01T00:00:00Z",
                                    "command": "rre-train", "token": "t", "heartbeat": time.time() - age_s}))

    other_host(30)
    with pytest.raises(workdir_lock.WorkdirLocked, match="host tpu-vm-7, pid 4242"):
        with workdir_lock.hold(str(workdir), "rre-eval"):
            pass
    other_host(workdir_lock.STALE_AFTER_S + 60)  # preempted: no heartbeat since
    with workdir_lock.hold(str(workdir), "rre-train") as me:
        assert workdir_lock.read_holder(str(workdir)).token == me.token


def test_a_refused_command_creates_nothing_and_leaves_no_directory(tmp_path):
    workdir = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with workdir_lock.hold(str(workdir), "rre-eval"):
            assert (workdir / workdir_lock.LOCK_NAME).exists()
            raise RuntimeError("a user error found after the lock")
    assert not (tmp_path / "new").exists()


def test_a_second_rre_train_on_a_running_workdir_is_refused(assets, tmp_path):
    """Two ``rre-train`` on one workdir (a launch command re-run in another terminal): the second exits 2 with one
    line naming the first, writes nothing, and the first finishes with every step logged once."""
    workdir = tmp_path / "run"
    args, env = train_command(workdir, assets, 4, 2)
    first = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_file = workdir / "rre_train.log"
    deadline = time.monotonic() + 900
    while first.poll() is None and time.monotonic() < deadline:  # the first run is training
        if log_file.exists() and "training prompts" in log_file.read_text(errors="replace"):
            break
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the second started"
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file() and p.name != "rre.lock"}
    second = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"rre-train: error: --workdir {workdir} is in use by rre-train (host ")
    assert f"pid {first.pid}," in lines[0] and "wait for it to finish" in lines[0]
    assert log_file.read_text().count("training prompts") == 1  # the second run logged nothing there
    assert first.wait(timeout=900) == 0, first.stderr.read()
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/proxy" in r] == [1, 2, 3, 4]  # each step once, from one run
    assert all(p.exists() for p in before)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert not (workdir / "rre.lock").exists()
