"""``rre-eval``: sample every saved checkpoint of a run on an eval set, score the responses with the training
proxy, RER, every feature and the gold RM, store them and rebuild the proxy-vs-gold report
(``rre_jax.checkpoint_eval``).

    rre-eval --workdir DIR --eval-set alpaca_eval.json [--steps 500,1000] [--config FILE[:arg]]
             [--config.gold_rm.path=DIR ...] [--out DIR] [--overwrite | --skip-existing]
             [--temperature 0.7 --top-p 1 --max-new-tokens 512] [--batch-size N] [--seed S] [--n-boot 1000]
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from rre_jax import errors
from rre_jax.configs import loader

# What a user can get wrong before anything is sampled: files, steps, fields (the library raises these with the
# file, step or field named).
USER_ERRORS = (errors.UserError, OSError, ValueError, KeyError)


def steps_arg(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected comma-separated integers, e.g. 500,1000")


def common_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of every command that reads a run's checkpoints."""
    parser.add_argument("--workdir", required=True, help="run directory (holds checkpoints/)")
    parser.add_argument("--config", default=None,
                        help="config file path.py[:arg] or .json (default: the config saved in the checkpoint); "
                             "--config.a.b=VALUE changes one field of either")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: config.ppo.batch_size)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs already written")


def quiet_libraries() -> None:
    """rre_jax's own INFO lines; libraries (absl, orbax, jax) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rre_jax").setLevel(logging.INFO)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """``(args, config or None, overrides)`` from ``argv``: the config named by ``--config`` (None: the one the
    checkpoint saved) and the ``--config.a.b=v`` overrides to apply to whichever config is used."""
    overrides, rest = loader.split_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    return args, (loader.load(args.config) if args.config else None), overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rre-eval", description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--eval-set", required=True, help="AlpacaEval/AlpacaFarm prompt file (.json or .jsonl)")
    parser.add_argument("--steps", type=steps_arg, default=None,
                        help="e.g. 0,500,1000; 0 is the initial policy (default: every checkpoint)")
    parser.add_argument("--out", default=None, help="rollout store and report directory (default: WORKDIR/eval)")
    parser.add_argument("--skip-existing", action="store_true", help="keep steps already stored, sample the rest")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: config.seed)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the report's intervals")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rre-eval`` on ``argv``; 0 on success, 2 (and one line) on a user's mistake."""
    from rre_jax import checkpoint_eval
    try:
        args, config, overrides = parse(build_parser(), argv)
        quiet_libraries()
        plan = checkpoint_eval.plan_eval(
            args.workdir, args.eval_set, steps=args.steps, config=config, overrides=overrides, out=args.out,
            overwrite=args.overwrite, skip_existing=args.skip_existing, temperature=args.temperature,
            top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
            n_boot=args.n_boot)
    except USER_ERRORS as e:
        return errors.report("rre-eval", e.args[0] if isinstance(e, KeyError) and e.args else e)
    summary = checkpoint_eval.run_eval(plan)
    print(f"rre-eval: report {plan.out_dir / 'report.md'} (checkpoints {summary.get('steps')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
