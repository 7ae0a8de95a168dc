"""``rre-alignment-tax``: SuperNI ROUGE-L of a checkpoint's greedy answers (``rre_jax.alignment_tax``).

    rre-alignment-tax --workdir DIR --step N --tasks-dir natural-instructions/ [--max-instances 100]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Sequence

from rre_jax.cli import common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rre-alignment-tax", description=__doc__.split("\n\n")[0])
    common.common_args(parser)
    parser.add_argument("--step", type=int, required=True, help="checkpoint step")
    parser.add_argument("--tasks-dir", required=True, help="natural-instructions root (splits/ and tasks/)")
    parser.add_argument("--max-instances", type=int, default=100, help="first instances of each test task")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--out", default=None, help="predictions JSONL (default: WORKDIR/alignment_tax/step_N.jsonl)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rre-alignment-tax`` on ``argv``; 0 on success, 2 (and one line) on a user's mistake."""
    from rre_jax import checkpoint_eval
    with contextlib.ExitStack() as held:  # the workdir's lock, until the command ends
        try:
            args, config, overrides = common.start(build_parser(), argv, held)
            plan = checkpoint_eval.plan_alignment_tax(
                args.workdir, args.step, args.tasks_dir, config=config, overrides=overrides,
                max_instances=args.max_instances, max_new_tokens=args.max_new_tokens,
                max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, out=args.out,
                overwrite=args.overwrite)
        except common.USER_ERRORS as e:
            return common.report_user_error("rre-alignment-tax", e)
        common.log_to_workdir(args.workdir, "rre_alignment_tax.log")
        result = checkpoint_eval.run_alignment_tax(plan)
        print(f"rre-alignment-tax: step {result['step']}: ROUGE-L {result['rougeL']:.2f} over "
              f"{result['n_instances']} instances of {result['n_tasks']} tasks", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
