"""``rre-train``: load the config, optionally start ``jax.distributed``, validate, then ``train.run``.

    rre-train --config configs/tiny.py[:rer] --workdir DIR [--config.ppo.learning_rate=1e-4 ...]

``--config`` defaults to the shipped tiny config, so ``rre-train --workdir /tmp/x`` runs the tiny job. The
config is loaded and every ``--config.a.b=v`` override applied by ``rre_jax.configs.loader`` (the loader
every command uses); an unknown field, a bad value or an invalid config is reported on one line, with exit
status 2, before anything is loaded, written or compiled.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rre_jax import errors
from rre_jax.configs import loader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rre-train", description="Train (or resume) a policy against a white-box proxy reward.",
        epilog="Any config field is set with --config.a.b=VALUE (e.g. --config.ppo.learning_rate=1e-4).")
    p.add_argument("--config", default="tiny",
                   help="config file[:arg] (e.g. configs/alpacafarm_rer.py:li,v4-32), a shipped config name, "
                        "or a .json dump (default: tiny)")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, exports; resumes if present")
    return p


def _config_errors() -> tuple[type[BaseException], ...]:
    return (errors.UserError, ValueError, KeyError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rre-train`` on ``argv`` (default: the command line); 0 on success, 2 on a user's mistake."""
    try:
        overrides, rest = loader.split_argv(sys.argv[1:] if argv is None else argv)
    except errors.UserError as e:
        return errors.report("rre-train", e)
    args = build_parser().parse_args(rest)
    try:
        config = loader.load_with_overrides(args.config, overrides)
        from rre_jax import distributed, train  # after parsing: keeps --help fast
        distributed.maybe_initialize(config.distributed)
        train.validate(config)  # every config error surfaces here, before anything is loaded or compiled
    except _config_errors() as e:
        return errors.report("rre-train", e.args[0] if isinstance(e, KeyError) and e.args else e)
    train.run(config, args.workdir)
    return 0


def run() -> None:
    """The console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
