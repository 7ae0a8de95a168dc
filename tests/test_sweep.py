"""Sweeps (``config.sweep``): the members of a sweep are the runs they stand for.

The config is checked before anything is written; on the tiny config a 2-member sweep (two presets, one seed) and
each member trained alone give the same rollouts, rewards and metrics step by step for 10 steps; a sweep killed
after a save resumes every member to its uninterrupted metrics."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rre_jax import aot, checkpoint, memory, mesh as mesh_lib, programs, rollout, run_spec, sweep, sweep_programs
from rre_jax import sweep_run, train
from rre_jax.configs import tiny as tiny_config
from rre_jax.errors import UserError

from test_train import REPO, rows_by_step, tiny_cfg, train_command

STEPS = 10
PRESETS = ("li", "rer")
# sampled tokens decide these: with the same tokens they are the same numbers
EXACT = ("reward/", "response/", "rollout/", "train/", "eval/")


# ======================================================================================= the config

def test_the_tiny_sweep_config():
    spec = run_spec.validate(tiny_config.get_config("sweep"), files=False)
    assert [m.name for m in spec.sweep.members] == [f"{p}-s0" for p in sweep.PAPER_PRESETS]
    cfg = tiny_config.get_config("sweep")
    cfg.sweep.seeds = (0, 1)
    members = run_spec.validate(cfg, files=False).sweep.members
    assert [m.name for m in members[:3]] == ["li-s0", "li-s1", "li_rp-s0"] and len(members) == 10
    one = sweep.member_config(cfg, members[1])
    assert (one.reward.preset, one.seed, tuple(one.sweep.presets), one.name) == ("li", 1, (), "tiny_sweep-li-s1")
    assert run_spec.validate(one, files=False).sweep is None  # a member's config is a single run's


@pytest.mark.parametrize("field,value,says", [
    ("model.train_mode", "full", r"config\.sweep: a sweep trains its members as LoRA adapters .* "
                                 r"--config\.model\.train_mode=lora"),
    ("sweep.presets", ("li", "lirp"), r"config\.sweep\.presets: unknown reward preset 'lirp'; choose from"),
    ("sweep.presets", ("li", "li"), r"names a preset twice"),
    ("sweep.presets", ("rer_predicted_qtype",), r"rre-label-qtype"),
    ("sweep.seeds", (0, 0), r"config\.sweep\.seeds=\(0, 0\) names a seed twice"),
    ("sweep.update_members", 6, r"config\.sweep\.update_members=6: .* 1 \(one after another\) to 5"),
])
def test_sweep_config_errors_name_the_field(field, value, says):
    cfg = tiny_config.get_config("sweep")
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(UserError, match=says):
        run_spec.validate(cfg, files=False)


def test_seeds_without_presets_is_an_error():
    cfg = tiny_config.get_config()
    cfg.sweep.seeds = (0, 1)
    with pytest.raises(UserError, match=r"config\.sweep\.seeds=\(0, 1\) but config\.sweep\.presets is empty"):
        run_spec.validate(cfg, files=False)


def test_a_full_finetuning_sweep_fails_in_one_line_before_anything_is_written(tmp_path):
    workdir = tmp_path / "never"
    out = subprocess.run([sys.executable, "-m", "rre_jax.cli.train", f"--workdir={workdir}",
                          f"--config={REPO / 'configs' / 'tiny.py'}:sweep", "--config.model.train_mode=full"],
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.sweep" in lines[0] and "train_mode=lora" in lines[0], out.stderr
    assert not workdir.exists()


# ======================================================================================= equivalence

def _member_rollouts(recorded, k):
    return [rollout.Rollout(*(np.asarray(x)[k] for x in roll)) for roll in recorded]


@pytest.fixture(scope="module")
def equivalence(assets, tmp_path_factory, request):
    """A 2-member sweep of the tiny config (presets li and rer, seed 0) for 10 steps with two dev evals, and each
    member trained alone with its sampler teacher-forced to the sweep's rollouts of that member: ``(root,
    {member: flips})``, a flip being a sampled row whose tokens the run alone drew otherwise than the sweep
    (``(call, row, first differing position)``; float noise in a near-tie of the Gumbel-max draw)."""
    root = tmp_path_factory.mktemp("sweep_equivalence")
    over = {"train.steps": STEPS, "train.save_freq": 5}
    cfg = tiny_cfg(assets, **over)
    cfg.sweep.presets = PRESETS
    recorded = []
    mp = pytest.MonkeyPatch()
    sweep_sampler = sweep_programs.SweepPrograms.sampler

    def spy(self, scfg, group=1):
        call = sweep_sampler(self, scfg, group)
        return lambda *args: recorded.append(call(*args)) or recorded[-1]
    mp.setattr(sweep_programs.SweepPrograms, "sampler", spy)
    sweep_run.run(cfg, str(root / "sweep"))
    mp.undo()
    flips = {}
    run_sampler = programs.RunPrograms.sampler
    for k, preset in enumerate(PRESETS):
        forced, flips[f"{preset}-s0"] = iter(_member_rollouts(recorded, k)), []

        def teacher_forced(self, scfg, group=1, flips=flips[f"{preset}-s0"], forced=forced):
            call = run_sampler(self, scfg, group)

            def sample(*args):
                own, want = call(*args), next(forced)
                for row in np.flatnonzero((np.asarray(own.tokens_BxN) != want.tokens_BxN).any(1)):
                    at = int(np.argmax(np.asarray(own.tokens_BxN)[row] != want.tokens_BxN[row]))
                    flips.append((len(flips), int(row), at))
                return rollout.Rollout(*(jax.device_put(w, o.sharding) for w, o in zip(want, own)))
            return sample
        mp.setattr(programs.RunPrograms, "sampler", teacher_forced)
        train.run(tiny_cfg(assets, preset, **over), str(root / f"{preset}-s0"))
        mp.undo()
        assert next(forced, None) is None, "the run alone sampled fewer times than its member"
    (root / "flips.json").write_text(json.dumps(flips))
    return root, flips


def test_every_sampled_token_is_the_runs(equivalence):
    """The rollouts: every token each member sampled is the one its run alone samples from the same state (a flip
    would be listed here with its call, row and position; none is allowed beyond one row in a hundred)."""
    root, flips = equivalence
    rows = (STEPS + 2) * 16  # 10 training batches and two dev batches of 16 rows
    for member, where in flips.items():
        assert len(where) <= rows // 100, f"{member}: sampled rows that differ from the run alone: {where}"


def _atol(key: str, row: dict) -> float:
    """Absolute tolerance of an update statistic. The sweep's matmuls multiply every member's rows at once, and
    XLA:CPU rounds a float32 product by how many rows it holds (1 ulp of the logits, about 1e-6 relative, for 24
    of 72 rows against 24 alone): the statistics differ by float rounding of the terms they are made of.
    ``objective/kl`` sums ``logp - ref_logp`` over each response, so its error is relative to the summed log-probs
    (``objective/entropy``, about 100 here): 1e-7 of those; every other statistic is a mean of terms of order 1
    (advantages, ratios, values, their squares): 1e-6. Measured (AMD EPYC, 8 CPU devices): objective/kl 1.2e-6 of
    0.22 (sums of about 100), ppo/loss/policy 5.6e-8 of 0.0033, everything else below 4e-7."""
    if key == "objective/kl":
        return 1e-7 * abs(row["objective/entropy"])
    return 1e-6


def test_members_log_their_runs_metrics(equivalence):
    """Every metric of every step of each member is the run's alone: the ones the sampled tokens decide (rewards,
    lengths, decode steps, dev evals with gold) exactly, and the update's statistics to float rounding
    (`_atol`, and 1e-5 relative)."""
    root, flips = equivalence
    for preset in PRESETS:
        member = f"{preset}-s0"
        alone, swept = rows_by_step(root / member), rows_by_step(root / "sweep" / member)
        assert sorted(alone) == sorted(swept) == list(range(1, STEPS + 1))
        assert "eval/gold" in swept[5] and "eval/gold" in swept[STEPS] and "ppo/loss/total" in swept[STEPS]
        for step in alone:
            keys = {k for k in alone[step] if not k.startswith(("time/", "compile/"))}
            assert keys == {k for k in swept[step] if not k.startswith(("time/", "compile/"))}, f"step {step}"
            for k in sorted(keys):
                got, want = swept[step][k], alone[step][k]
                if k.startswith(EXACT):
                    assert got == want, f"{member} step {step} {k}: sweep {got} != alone {want}"
                else:
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=_atol(k, alone[step]),
                                               err_msg=f"{member} step {step} {k}")


def test_members_write_a_runs_workdir(equivalence):
    """Each member's directory holds what its run's workdir holds; its checkpoints restore as the run's state and
    carry the run's config."""
    root, _ = equivalence
    for preset in PRESETS:
        member = root / "sweep" / f"{preset}-s0"
        assert {"metrics.jsonl", "tensorboard", "checkpoints", "dev_eval"} <= {p.name for p in member.iterdir()}
        ckpt = checkpoint.CheckpointManager(str(member))
        meta = ckpt.restore_meta(STEPS)
        ckpt.close()
        assert meta["config"]["reward"]["preset"] == preset and meta["config"]["sweep"]["presets"] == []
        assert meta["sweep"]["member"] == f"{preset}-s0"
    listed = json.loads((root / "sweep" / sweep.SWEEP_FILE).read_text())
    assert [m["name"] for m in listed["members"]] == [f"{p}-s0" for p in PRESETS]


# ======================================================================================= resume

def _sweep_command(workdir, assets, steps: int, save_freq: int):
    """``rre-train`` of a 2-member tiny sweep (li, rer) in ``workdir``: ``(args, env)``."""
    args, env = train_command(workdir, assets, steps, save_freq)
    at = next(i for i, a in enumerate(args) if a.startswith("--config="))
    args[at] += ":sweep"
    return args + [f"--config.sweep.presets={','.join(PRESETS)}"], env


def test_a_killed_sweep_resumes_every_member_to_its_uninterrupted_metrics(assets, tmp_path):
    """A sweep killed (SIGKILL) right after every member saved step 2, and run again, resumes every member from
    step 2: steps 3-4 of each member are those of an uninterrupted sweep, every metric (timings aside)."""
    members = [f"{p}-s0" for p in PRESETS]
    args, env = _sweep_command(tmp_path / "ref", assets, 4, 2)
    subprocess.run(args, env=env, check=True, cwd=REPO, capture_output=True)
    args, env = _sweep_command(tmp_path / "killed", assets, 4, 2)
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_file = tmp_path / "killed" / "rre_train.log"
    deadline = time.monotonic() + 1800
    while proc.poll() is None and time.monotonic() < deadline:
        if log_file.exists() and "saved checkpoints for step 2" in log_file.read_text(errors="replace"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    for m in members:
        steps = sorted(p.name for p in (tmp_path / "killed" / m / "checkpoints").iterdir())
        assert steps == ["2"], f"{m}: expected only the step-2 checkpoint before resuming, found {steps}"
    resumed = subprocess.run(args, env=env, check=True, cwd=REPO, capture_output=True, text=True)
    assert "took over the lock" in resumed.stderr  # the killed sweep's stale locks (rre_jax.workdir_lock)
    assert "resumed 2 members from step 2" in (tmp_path / "killed" / "rre_train.log").read_text(errors="replace")
    for m in members:
        ref, got = rows_by_step(tmp_path / "ref" / m), rows_by_step(tmp_path / "killed" / m)
        assert sorted(got) == sorted(ref) == [1, 2, 3, 4], m
        for step in (3, 4):
            want = {k: v for k, v in ref[step].items() if not k.startswith(("time/", "compile/"))}
            have = {k: v for k, v in got[step].items() if not k.startswith(("time/", "compile/"))}
            assert have == want, f"{m} step {step} differs after the resume"


# ======================================================================================= compile ahead of time

TPU_SWEEP = ("--config.mesh.shape=1,2,2", "--config.mesh.topology=v5e:2x2")


def test_compile_only_compiles_the_tiny_sweep_for_a_v5e_2x2(tmp_path):
    """``rre-train --compile_only`` on the tiny sweep (the paper's five presets) for a v5e 2x2 topology, with XLA's
    TPU compiler on this host: exit 0; every program of a sweep (a run's, and the member state's ``split`` and
    ``join``) compiled and fitting; the roofline phases of the compiled programs; nothing written but the report."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is part of the test extra")
    work = tmp_path / "W"
    out = subprocess.run([sys.executable, "-m", "rre_jax.cli.train", f"--config={REPO / 'configs' / 'tiny.py'}:sweep",
                          f"--workdir={work}", "--compile_only", *TPU_SWEEP, f"--compile_report={work / 'report.json'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["report.json"]
    rep = json.loads((work / "report.json").read_text())
    assert rep["fits"] and rep["devices"] == 4 and rep["chip"]["kind"] == "TPU v5 lite"
    assert [r["name"] for r in rep["programs"]] == ["init", "cache", "sampler", "features", "experience", "update",
                                                    "split", "join", "relevance", "gold"]
    for phase in ("rollout", "experience", "update"):
        assert rep["phases"][phase]["flops"] > 0, phase
    update = next(r for r in rep["programs"] if r["name"] == "update")
    assert "ppo/loss/total" in update["stats"]


def _resident_state(cfg) -> int:
    """Per-device bytes of the train state ``--compile_only`` lays out for ``cfg`` on this host's 8 devices."""
    mesh, devices = aot.mesh_for(mesh_lib.MeshConfig.from_config(cfg.mesh), "")
    spec = run_spec.validate(cfg, num_devices=len(devices), files=False)
    pcfg, gold_cfg, rcfg = aot._architectures(cfg, spec)
    progs = aot.run_programs(cfg, spec, programs.Layout(mesh, spec.mesh.rules), pcfg, gold_cfg, rcfg, False)
    return aot.device_bytes(progs.state.target())


def test_a_sweep_holds_every_members_state():
    """The sweep's train state is K = 5 runs' states, byte for byte on each device (each member's laid out as its
    run's, the member axis unsplit), and the memory plan counts K trainable trees and optimizer states."""
    swept, alone = tiny_config.get_config("sweep"), tiny_config.get_config()
    K = len(sweep.PAPER_PRESETS)
    assert _resident_state(swept) == K * _resident_state(alone)
    plan_swept, plan_alone = memory.plan(swept), memory.plan(alone)
    for line in ("optimizer state", "trainable (LoRA + value head)"):
        assert plan_swept.lines[line] == K * plan_alone.lines[line], line
    assert plan_swept.train > plan_alone.train


# ======================================================================================= the README's command

def _readme_sweep_command() -> list[list[str]]:
    """The README's one command for the tiny sweep and its comparison: ``[rre-train args, rre-eval args]``."""
    line = next(x for x in (REPO / "README.md").read_text().splitlines()
                if x.startswith("rre-train --config configs/tiny.py:sweep"))
    return [part.split() for part in line.split("&&")]


def test_the_readmes_sweep_command_trains_then_compares_every_member(tmp_path):
    """The README's command (two presets and two steps here, to be quick) on the tiny config, from the repository:
    rre-train trains the sweep, rre-eval on its workdir evaluates every member over the trunk the sweep built
    (each member's ``assets`` is the sweep's) and writes the comparison, one row per member."""
    train_args, eval_args = _readme_sweep_command()
    assert train_args[0] == "rre-train" and eval_args[0] == "rre-eval", (train_args, eval_args)
    workdir = tmp_path / "sweep"
    swap = {"/tmp/rre_sweep": str(workdir)}
    train_args, eval_args = ([swap.get(a, a) for a in args[1:]] for args in (train_args, eval_args))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    quick = [f"--config.sweep.presets={','.join(PRESETS)}", "--config.train.steps=2", "--config.train.save_freq=2",
             "--config.train.dev_size=4", "--config.model.sft_steps=10"]
    for module, args in (("train", train_args + quick), ("eval", eval_args)):
        out = subprocess.run([sys.executable, "-m", f"rre_jax.cli.{module}", *args], capture_output=True, text=True,
                             cwd=REPO, env=env, timeout=1800)
        assert out.returncode == 0, f"rre-{module}: {out.stderr[-3000:]}"
    members = [f"{p}-s0" for p in PRESETS]
    for m in members:
        assert os.path.realpath(workdir / m / "assets") == os.path.realpath(workdir / "assets")
        assert (workdir / m / "eval" / "step_2" / "model_outputs.json").exists(), m
    table = (workdir / "comparison" / "comparison.md").read_text()
    assert all(f"| {m} | 2 |" in table for m in members), table
    assert (workdir / "comparison" / "comparison.png").stat().st_size > 0
    assert sorted(m["member"] for m in json.loads((workdir / "comparison" / "comparison.json").read_text())
                  ["members"]) == members
