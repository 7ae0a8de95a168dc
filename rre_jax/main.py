"""``rre-train``: flags, optional ``jax.distributed`` start-up, then ``train.run``.

    rre-train --config configs/tiny.py[:rer] --workdir DIR [--config.ppo.learning_rate=1e-4 ...]

``--config`` defaults to the shipped tiny config, so ``rre-train --workdir /tmp/x`` runs the tiny job.
Every ``--config.a.b=v`` override is checked against the config before flag parsing: an unknown field is
reported with the valid fields of its section, before anything is loaded or compiled.
"""
from __future__ import annotations

import importlib.util
import sys

from absl import app, flags
from ml_collections import config_flags

from rre_jax import configs, errors

_FLAGS: dict = {}


def _define_flags():
    """Defined in ``run`` (not at import): config_flags reads the overrides as soon as the flag exists."""
    if not _FLAGS:
        _FLAGS["config"] = config_flags.DEFINE_config_file(
            "config", configs.path("tiny"),
            "Config file, optionally with ':arg' (e.g. configs/alpacafarm_rer.py:li).", lock_config=True)
        _FLAGS["workdir"] = flags.DEFINE_string(
            "workdir", None, "Run directory: checkpoints, metrics, exports. Resumes if present.")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; config fields are set as --config.a.b=value")
    config = _FLAGS["config"].value
    from rre_jax import distributed, train  # after flag parsing: keeps --help fast
    distributed.maybe_initialize(config.distributed)
    try:
        train.validate(config)  # every config and input-file error surfaces here, before anything is written
    except (ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(errors.report("rre-train", e))
    try:
        train.run(config, _FLAGS["workdir"].value)
    except errors.UserError as e:  # found later (e.g. a checkpoint that does not fit the run): still one line
        sys.exit(errors.report("rre-train", e))


def _config_arg(argv) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return configs.path("tiny")


def check_overrides(argv) -> str | None:
    """The first unknown ``--config.a.b`` field in ``argv`` as an error message, or None."""
    spec = _config_arg(argv)
    path, _, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_rre_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(arg or None)
    except Exception:  # a broken config file is reported by config_flags itself, with its traceback
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        keys = a[len("--config."):].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(keys):
            if not hasattr(node, "keys") or key not in node.keys():
                where = ".".join(keys[:depth]) or "<top level>"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"unknown config field {'.'.join(keys)!r} in {path}: {where} has no field {key!r}; "
                        f"valid fields: {valid}")
            node = node[key]
    return None


def run():
    error = check_overrides(sys.argv[1:])
    if error:
        sys.exit(errors.report("rre-train", error))
    _define_flags()
    flags.mark_flag_as_required("workdir")
    app.run(_main)


if __name__ == "__main__":
    run()
