"""Multi-host on one machine: two ``rre-train`` processes (4 CPU devices each) joined by ``jax.distributed``
over 127.0.0.1 with gloo collectives, against one process holding all 8 devices.

What a user relies on when moving from one host to a pod: the same global batch gives the same run (same
samples, same rewards, same PPO statistics up to the order of cross-host float sums); each host feeds only
its own rows of every batch; only process 0 writes metrics; the checkpoint the pair writes together restores
in a single process; the final export is whole.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rre_jax import assemble, checkpoint, metrics, train
from rre_jax.configs import tiny as tiny_config
from rre_jax.data import batching, tiny_prompts_path
from test_train import build

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
STEPS = 3
# sampled tokens decide these: they must agree exactly
EXACT = ("reward/", "response/", "eval/", "rollout/", "train/")


def _overrides(assets) -> dict:
    prompts = str(tiny_prompts_path())
    return {"model.path": assets["policy"], "tokenizer.path": assets["tokenizer"], "gold_rm.path": assets["gold_rm"],
            "data.train_file": prompts, "data.dev_file": prompts, "data.bucket": 96, "train.dev_size": 4,
            "sampling.max_new_tokens": 16, "train.steps": STEPS, "train.save_freq": STEPS, "train.export_final": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed(i: int, port: int) -> list[str]:
    """The flags that make process ``i`` of 2 join the coordinator on ``port`` (every command takes them)."""
    values = {"initialize": True, "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": i}
    return [f"--config.distributed.{k}={v}" for k, v in values.items()]


def _spawn_pair(logdir: pathlib.Path, name: str, argv) -> list:
    """Two processes ``argv(i, port)`` (4 CPU devices each); their output goes to ``<logdir>/<name>.process<i>.log``."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}  # this checkout's rre_jax, whatever the venv has installed
    procs = []
    for i in range(2):
        log = open(logdir / f"{name}.process{i}.log", "w")
        procs.append((subprocess.Popen(argv(i, port), env=env, cwd=logdir, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _wait_pair(logdir: pathlib.Path, name: str, procs: list) -> list[str]:
    """Wait for both processes; each must exit 0. Returns their logs."""
    try:
        for proc, log in procs:
            proc.wait(timeout=900)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(logdir / f"{name}.process{i}.log").read_text() for i in range(2)]
    for i, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    return logs


def _train_argv(workdir: pathlib.Path, overrides: dict):
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return lambda i, port: [sys.executable, str(WORKER), str(workdir / f"record{i}.json"), f"--workdir={workdir}",
                            f"--config={REPO / 'configs' / 'tiny.py'}", *flags, *_distributed(i, port)]


def _run_pair(workdir: pathlib.Path, overrides: dict) -> list[dict]:
    workdir.mkdir(exist_ok=True)
    _wait_pair(workdir.parent, workdir.name, _spawn_pair(workdir.parent, workdir.name, _train_argv(workdir, overrides)))
    return [json.loads((workdir / f"record{i}.json").read_text()) for i in range(2)]


def _cfg(overrides: dict, **more):
    cfg = tiny_config.get_config()
    for key, value in {**overrides, **more}.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return cfg


def _rows(workdir) -> dict:
    out = {}
    for row in metrics.read_metrics(str(workdir)):
        out.setdefault(row["step"], {}).update(row)
    return out


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """The pair's run, and the same run in this (8-device) process with the prompt rows it consumed."""
    root = tmp_path_factory.mktemp("multihost")
    overrides = _overrides(assets)
    records = _run_pair(root / "pair", overrides)
    seen = []
    next_batch = batching.PromptIterator.__next__

    def spy(self):
        batch = next_batch(self)
        seen.append(batch.index_B.tolist())
        return batch

    batching.PromptIterator.__next__ = spy
    try:
        train.run(_cfg(overrides), str(root / "single"))
    finally:
        batching.PromptIterator.__next__ = next_batch
    return {"root": root, "records": records, "single_batches": seen, "overrides": overrides}


def test_pair_matches_single_process(runs):
    pair, single = _rows(runs["root"] / "pair"), _rows(runs["root"] / "single")
    assert sorted(pair) == sorted(single) == list(range(1, STEPS + 1))
    assert "eval/gold" in pair[STEPS] and "ppo/loss/total" in pair[STEPS]
    for step in single:
        keys = {k for k in single[step] if not k.startswith(("time/", "compile/"))}
        assert keys == {k for k in pair[step] if not k.startswith(("time/", "compile/"))}, f"step {step} keys"
        for k in sorted(keys):
            got, want = pair[step][k], single[step][k]
            if k.startswith(EXACT):
                assert got == want, f"step {step} {k}: pair {got} != single {want}"
            else:  # cross-host sums (gradients, whitening) add in another order
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {step} {k}")


def test_each_host_feeds_only_its_share(runs):
    records, single = runs["records"], runs["single_batches"]
    assert [(r["process_index"], r["process_count"], r["local_devices"]) for r in records] == [(0, 2, 4), (1, 2, 4)]
    assert len(single) == STEPS and all(len(r["batches"]) == STEPS for r in records)
    for step, global_rows in enumerate(single):
        p0, p1 = records[0]["batches"][step], records[1]["batches"][step]
        assert len(p0) == len(p1) == len(global_rows) // 2
        assert p0 + p1 == global_rows, f"step {step + 1}: host shares {p0} + {p1} are not the global batch"


def test_only_process_zero_writes_metrics(runs):
    n_pair = len(metrics.read_metrics(str(runs["root"] / "pair")))
    assert n_pair == len(metrics.read_metrics(str(runs["root"] / "single"))) == STEPS + 1  # steps + one dev eval


def test_pair_checkpoint_restores_in_one_process(runs):
    """The state the pair saved at the last step restores here (8 devices, one process) and equals the
    single-process run's state; the data-iterator position travels with it."""
    cfg = _cfg(runs["overrides"], **{"reward.preset": "li", "reward.counterfactual": ("li",)})
    target = assemble.init_state(build(cfg, runs["root"] / "restore"), jax.random.key(0))
    restored = {}
    for name in ("pair", "single"):
        ckpt = checkpoint.CheckpointManager(str(runs["root"] / name))
        assert ckpt.all_steps() == [STEPS]
        restored[name] = ckpt.restore(STEPS, target)
        ckpt.close()
    (pair_state, pair_meta), (single_state, single_meta) = restored["pair"], restored["single"]
    assert int(pair_state["step"]) == STEPS and pair_meta["data"] == single_meta["data"]
    flat_pair, flat_single = (jax.tree_util.tree_leaves_with_path(s) for s in (pair_state, single_state))
    for (path, a), (_, b) in zip(flat_pair, flat_single):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4, atol=1e-6,
                                   err_msg=str(path))


def test_pair_export_is_whole(runs):
    from safetensors.numpy import load_file
    pair = load_file(str(runs["root"] / "pair" / "export" / "model.safetensors"))
    single = load_file(str(runs["root"] / "single" / "export" / "model.safetensors"))
    assert pair.keys() == single.keys()
    for k in single:
        assert pair[k].shape == single[k].shape, k
        np.testing.assert_allclose(pair[k], single[k], rtol=1e-4, atol=1e-6, err_msg=k)


# ======================================================================================= evaluation

EVAL_SET = REPO / "tests" / "data" / "eval_prompts.json"
TASKS = REPO / "tests" / "data" / "natural_instructions"


def _assert_same(pair, single, where="") -> None:
    """Equal JSON trees; floats to the module's tolerance (relevance encodes each host's share in its own batch)."""
    if isinstance(single, dict):
        assert pair.keys() == single.keys(), where
        for k in single:
            _assert_same(pair[k], single[k], f"{where}/{k}")
    elif isinstance(single, list):
        assert len(pair) == len(single), where
        for i, (a, b) in enumerate(zip(pair, single)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(single, float):
        np.testing.assert_allclose(pair, single, rtol=1e-5, atol=1e-6, err_msg=where)
    else:
        assert pair == single, where


def _jsonl(path) -> list:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def test_pair_eval_matches_single_process(runs):
    """rre-eval on two hosts gathers every host's rows: process 0 writes the same outputs, rollouts and report as
    one 8-device process."""
    from rre_jax.cli import eval as eval_cmd
    root = runs["root"]
    common = ["--workdir", str(root / "pair"), "--eval-set", str(EVAL_SET), "--max-new-tokens", "16", "--n-boot", "20"]
    argv = lambda i, port: [sys.executable, "-m", "rre_jax.cli.eval", *common, "--out", str(root / "eval_pair"),  # noqa: E731
                            *_distributed(i, port)]
    _wait_pair(root, "eval", _spawn_pair(root, "eval", argv))
    assert eval_cmd.main([*common, "--out", str(root / "eval_single")]) == 0
    pair, single = root / "eval_pair" / f"step_{STEPS}", root / "eval_single" / f"step_{STEPS}"
    outputs = json.loads((single / "model_outputs.json").read_text())
    assert len(outputs) == len(json.loads(EVAL_SET.read_text()))  # every prompt, not one host's share
    assert json.loads((pair / "model_outputs.json").read_text()) == outputs  # sampled texts agree exactly
    _assert_same(_jsonl(pair / "rollouts.jsonl"), _jsonl(single / "rollouts.jsonl"), "rollouts")
    _assert_same(json.loads((root / "eval_pair" / "summary.json").read_text()),
                 json.loads((root / "eval_single" / "summary.json").read_text()), "summary")


def test_pair_best_of_n_matches_single_process(runs):
    """rre-bon on two hosts samples every prompt x n rows once and process 0 writes the same samples and curves as
    one 8-device process."""
    from rre_jax.cli import bon
    root = runs["root"]
    common = ["--workdir", str(root / "pair"), "--step", str(STEPS), "--eval-set", str(EVAL_SET), "--n", "4",
              "--k", "1,2,4", "--max-new-tokens", "16", "--n-boot", "20"]
    argv = lambda i, port: [sys.executable, "-m", "rre_jax.cli.bon", *common, "--out", str(root / "bon_pair"),  # noqa: E731
                            *_distributed(i, port)]
    _wait_pair(root, "bon", _spawn_pair(root, "bon", argv))
    assert bon.main([*common, "--out", str(root / "bon_single")]) == 0
    pair, single = root / "bon_pair", root / "bon_single"
    samples = f"samples/step_{STEPS}"
    outputs = json.loads((single / samples / "model_outputs.json").read_text())
    assert len(outputs) == 4 * len(json.loads(EVAL_SET.read_text()))  # every prompt x n, not one host's share
    assert json.loads((pair / samples / "model_outputs.json").read_text()) == outputs
    _assert_same(_jsonl(pair / samples / "rollouts.jsonl"), _jsonl(single / samples / "rollouts.jsonl"), "rollouts")
    _assert_same(json.loads((pair / "curves.json").read_text()), json.loads((single / "curves.json").read_text()),
                 "curves")


def test_pair_alignment_tax_matches_single_process(runs):
    from rre_jax.cli import alignment_tax
    root = runs["root"]
    common = ["--workdir", str(root / "pair"), "--step", str(STEPS), "--tasks-dir", str(TASKS), "--max-instances", "3",
              "--max-new-tokens", "8"]
    argv = lambda i, port: [sys.executable, "-m", "rre_jax.cli.alignment_tax", *common,  # noqa: E731
                            "--out", str(root / "tax_pair.jsonl"),
                            *_distributed(i, port)]
    _wait_pair(root, "tax", _spawn_pair(root, "tax", argv))
    assert alignment_tax.main([*common, "--out", str(root / "tax_single.jsonl")]) == 0
    single = _jsonl(root / "tax_single.jsonl")
    assert len(single) > 3 and _jsonl(root / "tax_pair.jsonl") == single  # greedy answers agree exactly
    _assert_same(json.loads((root / "tax_pair.metrics.json").read_text()),
                 json.loads((root / "tax_single.metrics.json").read_text()), "metrics")


# ======================================================================================= preemption

def _logged_steps(workdir: pathlib.Path) -> set:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return {json.loads(line)["step"] for line in lines if line.endswith("\n")}


def _same_run(resumed: dict, uninterrupted: dict) -> None:
    assert sorted(resumed) == sorted(uninterrupted)
    for step in uninterrupted:
        want = {k: v for k, v in uninterrupted[step].items() if not k.startswith(("time/", "compile/"))}
        got = {k: v for k, v in resumed[step].items() if not k.startswith(("time/", "compile/"))}
        assert got == want, f"step {step} differs after the preemption"


def test_sigterm_saves_at_one_common_step_then_resumes_as_uninterrupted(runs):
    """SIGTERM to process 1 alone once step 1 is logged: JAX's preemption sync point has both hosts save the same
    step and exit 0; the same command then resumes, and every metric equals the uninterrupted pair's."""
    root, work = runs["root"], runs["root"] / "preempted"
    work.mkdir()
    procs = _spawn_pair(root, work.name, _train_argv(work, runs["overrides"]))
    while 1 not in _logged_steps(work):
        assert all(p.poll() is None for p, _ in procs), "the pair stopped before step 1"
        time.sleep(0.05)
    procs[1][0].send_signal(signal.SIGTERM)
    logs = _wait_pair(root, work.name, procs)
    ckpt = checkpoint.CheckpointManager(str(work))
    saved = ckpt.all_steps()
    ckpt.close()
    assert len(saved) == 1 and saved[0] < STEPS, f"expected one preemption checkpoint before step {STEPS}: {saved}"
    for i, log in enumerate(logs):
        assert f"preempted: saved step {saved[0]} " in log, f"process {i} did not stop at step {saved[0]}"
    assert not (work / "export").exists()
    _run_pair(work, runs["overrides"])
    _same_run(_rows(work), _rows(runs["root"] / "pair"))


def test_sigterm_single_process(runs, monkeypatch):
    """One process (no coordination service): its own SIGTERM handler, the same semantics."""
    work = runs["root"] / "preempted_single"
    write = metrics.MetricWriter.write

    def write_then_sigterm(self, step, scalars):
        write(self, step, scalars)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(metrics.MetricWriter, "write", write_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    train.run(_cfg(runs["overrides"]), str(work))
    assert signal.getsignal(signal.SIGTERM) is handler  # restored after the loop
    ckpt = checkpoint.CheckpointManager(str(work))
    assert ckpt.all_steps() == [1]
    ckpt.close()
    monkeypatch.setattr(metrics.MetricWriter, "write", write)
    train.run(_cfg(runs["overrides"]), str(work))
    _same_run(_rows(work), _rows(runs["root"] / "single"))
