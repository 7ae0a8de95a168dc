"""``rre-bon``: best-of-n overoptimization curves of one policy (`rre_jax.best_of_n`).

    rre-bon --workdir DIR --eval-set alpaca_eval.json --n 16 [--k 1,2,4,8,16] [--step N | --config FILE[:arg]]
            [--config.a.b=VALUE ...] [--out DIR] [--overwrite] [--temperature 0.7 --top-p 1 --max-new-tokens 512]
            [--batch-size B] [--seed S] [--n-boot 1000]

Without ``--step`` it samples the initial policy of ``--config``; with it, checkpoint N of the run in
``--workdir`` (config from the checkpoint unless ``--config``). Writes ``DIR/bon/step_<N>/`` (samples in the
rollout store's format, curves.json, curves.png, report.md) and prints the fitted gold peak of each preset.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Sequence

from rre_jax.cli import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rre-bon", description=__doc__.split("\n\n")[0])
    common.sampled_eval_args(p, out_help="output directory (default: WORKDIR/bon/step_<N>)",
                             n_boot_help="prompt-bootstrap resamples of the fits' intervals")
    p.add_argument("--n", type=int, required=True, help="samples per prompt")
    p.add_argument("--k", type=common.comma_ints("1,2,4,8"), default=None,
                   help="best-of-k values, each <= n (default: 1, 2, 4, ..., n)")
    p.add_argument("--step", type=int, default=None, help="checkpoint to sample (default: the initial policy)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rre-bon`` on ``argv``; 0 on success, 2 (and one line) on a user's mistake."""
    from rre_jax import best_of_n
    from rre_jax.evaluate import bon_report
    with contextlib.ExitStack() as held:  # the workdir's lock, until the command ends
        try:
            args, config, overrides = common.start(build_parser(), argv, held)
            plan = best_of_n.plan_best_of_n(
                args.workdir, args.eval_set, n=args.n, ks=args.k, step=args.step, config=config, overrides=overrides,
                out=args.out, overwrite=args.overwrite, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, n_boot=args.n_boot)
        except common.USER_ERRORS as e:
            return common.report_user_error("rre-bon", e)
        curves = best_of_n.run_best_of_n(plan)
        common.log_report("rre-bon", plan.run.config, args.workdir, plan.out_dir, plan.step, "bon")  # to W&B, when on
        for name, v in curves.get("variants", {}).items():
            fit = v["gold"]["fit"]
            peak = f"gold peak d* {fit['d_star']:.3g}" if math.isfinite(fit["d_star"]) else "gold: no peak"
            print(f"rre-bon: {name}: best-of-{curves['n']} proxy {v['proxy']['mean'][-1]:+.4g}, gold "
                  f"{v['gold']['mean'][-1]:+.4g}; {peak}" + ("; OVEROPTIMIZED" if v["overoptimized"] else ""),
                  file=sys.stderr)
        print(f"rre-bon: report {plan.out_dir / bon_report.REPORT_FILE}", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
