"""``rre-eval --workdir <sweep workdir>``: every member of a sweep evaluated as its own ``rre-eval`` would, then
the members compared (``evaluate.comparison``: the paper's table and one figure).

    rre-eval --workdir /tmp/sweep --eval-set alpaca_eval.json [--steps ...] [--out DIR] [rre-eval's options]

Member ``<preset>-s<seed>`` is evaluated exactly as ``rre-eval --workdir <workdir>/<preset>-s<seed>`` (its config
from its checkpoints, its report in ``<workdir>/<member>/eval``), one member after another (one policy on the
devices at a time). ``--out`` names the comparison's directory (default ``<workdir>/comparison``). Every
member's checkpoints and stored steps are checked before the first token is sampled.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax

from rre_jax import checkpoint_eval, evaluate, sweep, workdir_lock
from rre_jax.evaluate import comparison


def is_sweep(workdir: str) -> bool:
    """Whether ``workdir`` is a sweep's (it holds ``sweep.json``)."""
    return os.path.isfile(os.path.join(workdir, sweep.SWEEP_FILE))


def members(workdir: str) -> list[dict]:
    """``[{name, preset, seed}]`` of the sweep in ``workdir``, in its order."""
    with open(os.path.join(workdir, sweep.SWEEP_FILE)) as f:
        return json.load(f)["members"]


def check(workdir: str, *, steps=None, overwrite: bool = False, skip_existing: bool = False) -> None:
    """Before anything is sampled: every member has the checkpoints asked for, and no member's store already
    holds one of them unless ``overwrite`` or ``skip_existing`` (the errors name the member's directory)."""
    for m in members(workdir):
        where = os.path.join(workdir, m["name"])
        ckpt = checkpoint_eval.open_checkpoints(where)
        wanted = checkpoint_eval.resolve_steps(ckpt, steps)
        ckpt.close()
        stored = [s for s in wanted if s in evaluate.list_steps(os.path.join(where, "eval"))]
        if stored and not (overwrite or skip_existing):
            raise FileExistsError(f"{where}/eval already holds the eval of step(s) {stored}; pass --overwrite to "
                                  "replace them, --skip-existing to keep them, or --steps without them")


def evaluate_sweep(workdir: str, eval_set: str, *, out: str | None = None, progress: bool = True, **kwargs) -> dict:
    """Evaluate every member (``checkpoint_eval.plan_eval`` / ``run_eval`` with ``kwargs``), then write the
    comparison into ``out`` (default ``<workdir>/comparison``); returns the comparison."""
    check(workdir, steps=kwargs.get("steps"), overwrite=kwargs.get("overwrite", False),
          skip_existing=kwargs.get("skip_existing", False))
    summaries = []
    for m in members(workdir):
        where = os.path.join(workdir, m["name"])
        with workdir_lock.hold(where, "rre-eval"):  # each member's workdir is a run's
            plan = checkpoint_eval.plan_eval(where, eval_set, out=os.path.join(where, "eval"), **kwargs)
            summaries.append({**m, "summary": checkpoint_eval.run_eval(plan, progress=progress)})
        del plan  # this member's policy leaves the devices before the next one's loads
    out_dir = pathlib.Path(out or os.path.join(workdir, "comparison"))
    return comparison.write(out_dir, summaries) if jax.process_index() == 0 else {}
