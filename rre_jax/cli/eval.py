"""``rre-eval``: sample every saved checkpoint of a run on an eval set, score the responses with the training
proxy, RER, every feature and the gold RM, store them and rebuild the proxy-vs-gold report
(``rre_jax.checkpoint_eval``). On a sweep's workdir (``rre_jax.sweep_eval``): every member, then one comparison
(``<workdir>/comparison/``: the paper's table and one figure).

    rre-eval --workdir DIR --eval-set alpaca_eval.json [--steps 500,1000] [--config FILE[:arg]]
             [--config.gold_rm.path=DIR ...] [--out DIR] [--overwrite | --skip-existing]
             [--temperature 0.7 --top-p 1 --max-new-tokens 512] [--batch-size N] [--seed S] [--n-boot 1000]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Sequence

from rre_jax.cli import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rre-eval", description=__doc__.split("\n\n")[0])
    common.sampled_eval_args(parser, out_help="rollout store and report directory (default: WORKDIR/eval)",
                             n_boot_help="bootstrap resamples of the report's intervals")
    parser.add_argument("--steps", type=common.comma_ints("500,1000"), default=None,
                        help="e.g. 0,500,1000; 0 is the initial policy (default: every checkpoint)")
    parser.add_argument("--skip-existing", action="store_true", help="keep steps already stored, sample the rest")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rre-eval`` on ``argv``; 0 on success, 2 (and one line) on a user's mistake. A sweep's workdir
    (``rre_jax.sweep_eval``): every member, then their comparison."""
    from rre_jax import checkpoint_eval, sweep_eval
    with contextlib.ExitStack() as held:  # the workdir's lock, until the command ends
        try:
            args, config, overrides = common.start(build_parser(), argv, held)
            if sweep_eval.is_sweep(args.workdir):
                return _sweep(args, config, overrides)
            plan = checkpoint_eval.plan_eval(
                args.workdir, args.eval_set, steps=args.steps, config=config, overrides=overrides, out=args.out,
                overwrite=args.overwrite, skip_existing=args.skip_existing, temperature=args.temperature,
                top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                n_boot=args.n_boot)
        except common.USER_ERRORS as e:
            return common.report_user_error("rre-eval", e)
        common.log_to_workdir(args.workdir, "rre_eval.log")
        summary = checkpoint_eval.run_eval(plan)
        if summary.get("steps"):  # to the run's W&B run when config.logging.wandb is on
            common.log_report("rre-eval", plan.extra["config"], args.workdir, plan.out_dir, max(summary["steps"]),
                              "eval")
        if summary.get("damaged_steps"):
            print(f"rre-eval: skipped damaged checkpoint(s) {summary['damaged_steps']} (see the warnings above)",
                  file=sys.stderr)
        print(f"rre-eval: report {plan.out_dir / 'report.md'} (checkpoints {summary.get('steps')})", file=sys.stderr)
        return 0


def _sweep(args, config, overrides) -> int:
    """``rre-eval`` of a sweep's workdir (its lock held by ``main``): every member, then the comparison."""
    from rre_jax import sweep_eval
    common.log_to_workdir(args.workdir, "rre_eval.log")
    try:
        sweep_eval.evaluate_sweep(
            args.workdir, args.eval_set, out=args.out, steps=args.steps, config=config, overrides=overrides,
            overwrite=args.overwrite, skip_existing=args.skip_existing, temperature=args.temperature,
            top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
            n_boot=args.n_boot)
    except common.USER_ERRORS as e:
        return common.report_user_error("rre-eval", e)
    out = args.out or f"{args.workdir}/comparison"
    print(f"rre-eval: every member's report in {args.workdir}/<member>/eval; the comparison in {out}/comparison.md "
          f"and {out}/comparison.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
