"""``rre-train``: load the config, optionally start ``jax.distributed``, validate, then ``train.run``.

    rre-train --config configs/tiny.py[:rer] --workdir DIR [--config.ppo.learning_rate=1e-4 ...]

``--config`` defaults to the shipped tiny config, so ``rre-train --workdir /tmp/x`` runs the tiny job. The
config is loaded and every ``--config.a.b=v`` override applied by ``rre_jax.config_loader`` (the loader
every command uses); an unknown field, a bad value or an invalid config is reported on one line, with exit
status 2, before anything is loaded, written or compiled.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rre_jax import errors
from rre_jax import config_loader as loader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rre-train", description="Train (or resume) a policy against a white-box proxy reward.",
        epilog="Any config field is set with --config.a.b=VALUE (e.g. --config.ppo.learning_rate=1e-4).")
    p.add_argument("--config", default="tiny",
                   help="config file[:arg] (e.g. configs/alpacafarm_rer.py:li,v4-32), a shipped config name, "
                        "or a .json dump (default: tiny)")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, exports; resumes if present")
    p.add_argument("--compile_only", action="store_true",
                   help="compile every program from shapes for config.mesh.topology (e.g. v5e:2x4) or the local "
                        "devices and print XLA's bytes per device, fits or not, and roofline step times; reads no "
                        "weights, writes nothing but --compile_report; exit 1 when a program does not fit")
    p.add_argument("--compile_report", default="", help="with --compile_only: also write the table as JSON here")
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
        if args.compile_only:
            from rre_jax import aot
            return aot.main(config, args.compile_report)
        from rre_jax import assemble, distributed, run_spec  # after parsing: keeps --help fast
        distributed.maybe_initialize(config.distributed)
        spec = run_spec.validate(config)  # every config error surfaces here, before anything is loaded or compiled
        sources = assemble.load_prompt_sources(spec)  # each prompt file parsed once, before anything is written
    except _config_errors() as e:
        return errors.report("rre-train", e.args[0] if isinstance(e, KeyError) and e.args else e)
    try:
        _run(config, args.workdir, spec, sources)
    except errors.UserError as e:  # found later (e.g. a checkpoint that does not fit the run): still one line
        return errors.report("rre-train", e)
    except OSError as e:  # a write the storage refused (disk full, permission, a bucket): the path and what is intact
        from rre_jax import checkpoint
        return errors.report("rre-train", checkpoint.write_failure(e, args.workdir))
    return 0


def _run(config, workdir: str, spec, sources) -> None:
    """Train (a run, or a sweep: ``config.sweep``) with the compilation cache on and INFO logs in the workdir;
    print the closing summary."""
    import jax
    from rre_jax import compile_cache, console, sweep_run, train, workdir_lock
    from rre_jax.data import tiny_prompts_path
    compile_cache.enable()
    with workdir_lock.hold(workdir, "rre-train"):  # before the log file: a refused run writes nothing
        name = "rre_train.log" if jax.process_index() == 0 else f"rre_train.process{jax.process_index()}.log"
        log_file = console.log_to_file(console.log_path(workdir, name))
        (train.run if spec.sweep is None else sweep_run.run)(config, workdir, spec=spec, sources=sources)
    if jax.process_index() != 0:
        return
    if spec.sweep is not None:  # every member's run over one frozen trunk (rre_jax.sweep)
        print(sweep_run.summary(workdir))
    else:
        eval_set = config.data.dev_file or ("" if config.model.path else str(tiny_prompts_path()))
        print(console.train_summary(workdir, log_file=log_file, eval_set=eval_set))


def run() -> None:
    """The console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
