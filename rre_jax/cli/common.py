"""What the commands that read a run's checkpoints share (``rre-eval``, ``rre-bon``, ``rre-alignment-tax``): their
common arguments, the one way they parse ``--config`` and ``--config.a.b=v``, the user errors they report in one
line, and their console and log set-up."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Callable, Sequence

from rre_jax import errors
from rre_jax import config_loader as loader

# What a user can get wrong before anything is sampled: files, steps, fields (the library raises these with the
# file, step or field named).
USER_ERRORS = (errors.UserError, OSError, ValueError, KeyError)


def comma_ints(example: str) -> Callable[[str], list[int]]:
    """An argparse ``type`` for comma-separated integers (``example`` shows the form in its error)."""
    def parse(text: str) -> list[int]:
        try:
            return [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. {example}") from None
    return parse


def common_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of every command that reads a run's checkpoints."""
    parser.add_argument("--workdir", required=True, help="run directory (holds checkpoints/)")
    parser.add_argument("--config", default=None,
                        help="config file path.py[:arg] or .json (default: the config saved in the checkpoint); "
                             "--config.a.b=VALUE changes one field of either")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: config.ppo.batch_size)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs already written")


def sampled_eval_args(parser: argparse.ArgumentParser, *, out_help: str, n_boot_help: str) -> None:
    """`common_args` and the arguments of every command that samples a policy on an eval set and reports with
    bootstrap intervals: the eval set, the output directory, the sampling settings and seed, the resamples."""
    common_args(parser)
    parser.add_argument("--eval-set", required=True, help="AlpacaEval/AlpacaFarm prompt file (.json or .jsonl)")
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: config.seed)")
    parser.add_argument("--n-boot", type=int, default=1000, help=n_boot_help)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """``(args, config or None, overrides)`` from ``argv``: the config named by ``--config`` (None: the one the
    checkpoint saved) and the ``--config.a.b=v`` overrides to apply to whichever config is used."""
    overrides, rest = loader.split_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    return args, (loader.load(args.config) if args.config else None), overrides


def start(parser: argparse.ArgumentParser, argv: Sequence[str] | None, held: contextlib.ExitStack):
    """What every checkpoint command does first: `parse` ``argv``, `quiet_libraries`, `start_distributed`, then
    take the workdir's lock (`rre_jax.workdir_lock`) into ``held``, so it is released when the command ends;
    returns ``(args, config or None, overrides)``."""
    from rre_jax import workdir_lock
    args, config, overrides = parse(parser, argv)
    quiet_libraries()
    start_distributed(config, overrides)
    held.enter_context(workdir_lock.hold(args.workdir, parser.prog))  # one workdir, one command
    return args, config, overrides


def quiet_libraries() -> None:
    """The compilation cache on; only warnings and errors on the console."""
    from rre_jax import compile_cache
    compile_cache.enable()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def log_to_workdir(workdir: str, name: str) -> None:
    """Once the input is checked: INFO lines (rre_jax, absl, orbax, jax) to ``workdir/name``, warnings and
    errors still on the console."""
    from rre_jax import console
    console.log_to_file(console.log_path(workdir, name))


def start_distributed(config, overrides) -> None:
    """``jax.distributed`` for a multi-host eval, before anything touches a device: the ``distributed`` section of
    ``--config`` (or of the defaults) with the ``--config.distributed.*`` overrides. The checkpoint's saved section
    is not used: it names the training job's coordinator. On a TPU pod: ``--config.distributed.initialize=True``
    on every host (JAX finds the rest)."""
    from rre_jax import distributed
    from rre_jax.configs import defaults
    cfg = config if config is not None else defaults.base_config()
    for key, raw in overrides:
        if key.startswith("distributed."):
            loader.override(cfg, key, raw)
    distributed.maybe_initialize(cfg.distributed)


def log_report(command: str, config, workdir: str, report_dir, step: int, prefix: str) -> None:
    """A command's report (tables, figures) to the workdir's W&B run, when ``config.logging.wandb`` is on
    (`rre_jax.tracking`); ``config`` a ConfigDict or its JSON dict."""
    import ml_collections

    from rre_jax import tracking
    config = config if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(config)
    if tracking.log_report_to_run(config, workdir, str(report_dir), step, prefix):
        print(f"{command}: report logged to the W&B run of {workdir} ({tracking.RUN_FILE})", file=sys.stderr)


def report_user_error(command: str, e: Exception) -> int:
    """One line naming the mistake on stderr (a KeyError's message, not its repr); the exit status 2."""
    return errors.report(command, e.args[0] if isinstance(e, KeyError) and e.args else e)
