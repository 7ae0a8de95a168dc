"""The one list of a run's programs (``programs.RunPrograms``): what ``--compile_only`` compiles is what a run
compiles -- the same program names, the same input and output shardings of the compiled executables, the same
update statistics -- for PPO, GRPO and RLOO on the tiny config."""
import json

import jax
import numpy as np
import pytest

from rre_jax import aot, assemble, programs, run_spec, train

from test_train import build, tiny_cfg

ALGOS = ("ppo", "grpo", "rloo")
# one step with a dev eval (gold RM) on a one-device mesh, so the run meets every program once
STEP = {"train.steps": 1, "train.save_freq": 1, "train.dev_size": 4, "ppo.mini_batch_size": 4,
        "ppo.gradient_accumulation_steps": 2, "ppo.ppo_epochs": 1, "sampling.max_new_tokens": 16,
        "mesh.shape": (1, 1, 1), "mesh.num_devices": 1}


def _compiled(exe):
    """The executables an ``AheadOfTime`` holds (one per input signature)."""
    return list(exe._executables.values())


def _shardings(executable):
    return jax.tree.leaves(executable.input_shardings), jax.tree.leaves(executable.output_shardings)


def _same(a, b, ndims):
    assert len(a) == len(b), (len(a), len(b))
    bad = [(i, x, y) for i, (x, y, n) in enumerate(zip(a, b, ndims)) if not x.is_equivalent_to(y, n)]
    assert not bad, bad[:3]
    return True


@pytest.fixture(scope="module", params=ALGOS)
def both(request, assets, tmp_path_factory):
    """``(algo, the run's {name: [(Program, executable)]}, --compile_only's {name: (Program, executable)},
    the run's step-1 metrics)``."""
    algo = request.param
    cfg = tiny_cfg(assets, f"rer,{algo}", **STEP)
    wd = tmp_path_factory.mktemp(f"programs_{algo}")
    run = build(cfg, wd)
    state = assemble.init_state(run, jax.random.key(0))
    state, metrics = train.train_step(run, state, next(run.iterator))
    train.dev_eval(run, state, 1)
    ran: dict = {}
    for key, exe in run.programs.executables().items():
        prog = run.programs.programs()[key]
        ran.setdefault(prog.name, []).extend((prog, x) for x in _compiled(exe))
    spec = run_spec.validate(cfg)
    lay = programs.Layout(run.mesh, spec.mesh.rules)
    pcfg, gcfg, rcfg = aot._architectures(cfg, spec)
    needs_rel = any(s.needs_relevance for s in (spec.reward, *spec.counterfactual.values()))
    listed, _ = aot._programs(cfg, spec, lay, pcfg, gcfg, rcfg, needs_rel)
    return algo, ran, {name: (p, p.compile()) for name, p in listed.items()}, metrics


def test_the_same_programs(both):
    algo, ran, listed, _ = both
    assert set(ran) == set(listed), (algo, sorted(ran), sorted(listed))
    assert set(listed) >= {"init", "cache", "sampler", "experience", "update", "features", "relevance", "gold"}


def test_the_same_shardings(both):
    """Every executable the run compiled takes and returns its arrays in the shardings of the program
    ``--compile_only`` compiles under that name (read back from the executables)."""
    algo, ran, listed, _ = both
    for name, runs in ran.items():
        prog, exe = listed[name]
        want_in, want_out = _shardings(exe)
        nd_in = [len(x.shape) for x in jax.tree.leaves(prog.args)]
        nd_out = [len(x.shape) for x in jax.tree.leaves(jax.eval_shape(prog.jitted, *prog.args))]
        for run_prog, run_exe in runs:
            got_in, got_out = _shardings(run_exe)
            assert _same(got_in, want_in, nd_in), f"{algo} {name}: input shardings differ"
            assert _same(got_out, want_out, nd_out), f"{algo} {name}: output shardings differ"


def test_the_same_update_statistics(both):
    """The update --compile_only compiles is the algorithm's: its statistics are the keys the run logs."""
    algo, ran, listed, metrics = both
    prog, _ = listed["update"]
    stats = set(jax.eval_shape(prog.jitted, *prog.args)[1])
    (run_prog, _), = ran["update"]
    assert stats == set(jax.eval_shape(run_prog.jitted, *run_prog.args)[1])
    assert stats <= set(metrics)
    prefix = "ppo/" if algo == "ppo" else f"{algo}/"
    other = {"ppo/", "grpo/", "rloo/"} - {prefix}
    assert any(k.startswith(prefix) for k in stats) and not any(k.startswith(tuple(other)) for k in stats)
    exp = jax.eval_shape(listed["experience"][0].jitted, *listed["experience"][0].args)
    assert (exp.values_BxN is None) == (algo != "ppo")


def test_compile_report_shows_the_group_update(assets, tmp_path, capsys):
    """``--compile_only --compile_report`` on ``configs/tiny.py:grpo`` compiles GRPO's update, not PPO's: the
    report lists its statistics."""
    cfg = tiny_cfg(assets, "rer,grpo", **STEP)
    report = tmp_path / "report.json"
    assert aot.main(cfg, str(report)) == 0
    payload = json.loads(report.read_text())
    update = next(p for p in payload["programs"] if p["name"] == "update")
    assert update["stats"] and all(not k.startswith("ppo/") for k in update["stats"])
    assert any(k.startswith("grpo/") for k in update["stats"])
    assert {p["name"] for p in payload["programs"]} >= {"sampler", "experience", "update", "relevance", "gold"}
    assert payload["algorithm"] == "grpo" and np.isfinite(update["total"])
