"""GRPO and RLOO through the trainer on the tiny config: golden step, 1 device vs a (2,2,2) mesh, resume after
SIGKILL, no reference pass at beta 0, and bad group settings rejected by ``validate`` before any compile."""
import json
import os

import jax
import numpy as np
import pytest

from rre_jax import programs, run_spec, train
from rre_jax.configs import tiny as tiny_config
from rre_jax.errors import UserError

from test_train import REPO, build, train_command, check_resume_after_sigkill, rows_by_step, tiny_cfg

GOLDEN = {algo: REPO / "tests" / "golden" / f"tiny_{algo}_step1.json" for algo in ("grpo", "rloo")}
KEYS = ("reward/proxy", "reward/li", "reward/rp", "reward/qr", "reward/ar", "response/tokens_mean", "{a}/reward",
        "{a}/advantages_std", "{a}/loss", "{a}/entropy", "{a}/clip_ratio/region_mean")
EXTRA = {"grpo": ("grpo/frac_reward_zero_std",), "rloo": ("objective/kl", "rloo/shaped_reward")}
# Few steps, one optimizer step per pass: keeps each run to seconds on 2 cores.
SHORT = {"train.save_freq": 100, "ppo.mini_batch_size": 4, "ppo.gradient_accumulation_steps": 2}


def group_cfg(assets, algo, preset="rer", **overrides):
    """The tiny test config (tests/test_train.py) with the group variant ``configs/tiny.py:<preset>,<algo>``."""
    return tiny_cfg(assets, f"{preset},{algo}", **overrides)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_golden_step(assets, tmp_path, algo):
    """One step of each group method on the tiny config reproduces the recorded metrics."""
    train.run(group_cfg(assets, algo, **{**SHORT, "train.steps": 1}), str(tmp_path))
    keys = [k.format(a=algo) for k in KEYS] + list(EXTRA[algo])
    got = {k: rows_by_step(tmp_path)[1][k] for k in keys}
    if os.environ.get("RRE_UPDATE_GOLDEN"):
        GOLDEN[algo].write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN[algo].read_text())
    bad = {k: (got[k], want[k]) for k in keys if not np.isclose(got[k], want[k], rtol=1e-4, atol=1e-6)}
    assert not bad, (f"tiny {algo} step-1 metrics changed: {bad}. If intended, re-record with RRE_UPDATE_GOLDEN=1 "
                     f"python -m pytest tests/test_train_grpo.py::test_golden_step and say why in the commit.")
    assert got[f"{algo}/advantages_std"] > 0.1  # the groups' responses differ: there is a signal to learn from


def test_sharded_run_matches_single_device(assets, tmp_path):
    """GRPO with the KL term on 1 device and on a (2,2,2) mesh: with 16 responses over 4 batch shards every group
    of 4 sits on one (data, fsdp) shard pair, and the metrics agree within 1e-5."""
    over = {**SHORT, "train.steps": 2, "group.beta": 0.04}
    runs = {}
    for name, mesh in (("one", {"mesh.shape": (1, 1, 1), "mesh.num_devices": 1}), ("mesh", {"mesh.shape": (2, 2, 2)})):
        train.run(group_cfg(assets, "grpo", **over, **mesh), str(tmp_path / name))
        runs[name] = rows_by_step(tmp_path / name)
    for step in (1, 2):
        for k in ("grpo/loss", "grpo/kl", "grpo/advantages_std", "reward/proxy", "grpo/clip_ratio/region_mean"):
            np.testing.assert_allclose(runs["mesh"][step][k], runs["one"][step][k], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{k} step {step}")
    assert runs["mesh"][2]["grpo/kl"] > 0  # the policy moved off the reference


def test_resume_after_sigkill_matches_uninterrupted(assets, tmp_path):
    """RLOO killed (SIGKILL) right after its step-2 checkpoint and resumed: steps 3-4 equal an uninterrupted run."""
    def cli(workdir):
        args, env = train_command(workdir, assets, 4, 2)
        return args + ["--config.algo=rloo", "--config.group.beta=0.05", "--config.ppo.mini_batch_size=4"], env
    ref = check_resume_after_sigkill(tmp_path, cli)
    assert "rloo/loss" in ref[3]


def test_beta_zero_runs_no_reference_pass(assets, tmp_path):
    """The experience program at beta 0 computes the policy's log-probs only: half the FLOPs of the program with
    the reference pass (LoRA: the reference is the same network with adapters off, so the two passes cost about
    the same), and no reference log-probs come out."""
    run = build(group_cfg(assets, "grpo"), tmp_path)
    B, T, N = run.config.ppo.batch_size, 32, 32
    flops = {}
    for beta in (0.0, 0.04):
        algo = run_spec.validate(group_cfg(assets, "grpo", **{"group.beta": beta})).algorithm
        assert algo.uses_reference == (beta != 0) and not algo.uses_values
        prog = programs.build_experience(run.programs.layout, run.policy, algo, run.programs.state, B, T, N, None)
        out = jax.eval_shape(prog.jitted, *prog.args)
        assert (out.ref_logp_BxN is None) == (beta == 0) and out.values_BxN is None
        flops[beta != 0] = prog.compile().cost_analysis()["flops"]
    assert 0.4 < flops[False] / flops[True] < 0.6, flops


@pytest.mark.parametrize("override,match", [
    ({"algo": "ppo2"}, r"config.algo='ppo2'.*'ppo', 'grpo', 'rloo'"),
    ({"group.num_generations": 1}, r"config.group.num_generations=1"),
    ({"group.num_generations": 3}, r"config.ppo.batch_size=16.*not divisible into groups"),
    ({"group.beta": -0.01}, r"config.group.beta=-0.01"),
    ({"group.loss_type": "sum"}, r"config.group.loss_type='sum'"),
])
def test_validate_rejects_bad_group_settings(override, match, monkeypatch):
    """Raised by ``validate`` (before any model is loaded or program compiled) as a UserError naming the field."""
    cfg = tiny_config.get_config("grpo")
    (key, value), = override.items()
    if "." in key:
        cfg[key.split(".")[0]][key.split(".")[1]] = value
    else:
        cfg[key] = value
    monkeypatch.setattr(programs.RunPrograms, "_get", lambda *a: pytest.fail("compiled before validating"))
    with pytest.raises(UserError, match=match):
        run_spec.validate(cfg)
