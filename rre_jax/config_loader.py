"""The one way a run config is loaded and overridden, for every command.

A config is named by ``path/to/file.py[:arg]`` (big_vision style: the file's ``get_config(arg)``), by the name of
a shipped config (``tiny``, ``alpacafarm_rer:rer,v4-32``), or by a ``.json`` dump of one (what a checkpoint
saves). Fields are overridden with ``--config.a.b=value`` (or ``--config.a.b value``) on every command line;
the value is parsed against the field's current type, so ``--config.ppo.learning_rate=2e-3`` is a float,
``--config.mesh.shape=2,2,2`` a tuple and ``--config.model.path=123`` stays a string. An unknown field, a value
of the wrong type or a missing file is a ``UserError`` naming the field (or file) and the fix, raised before
anything is loaded or compiled.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

from rre_jax import configs
from rre_jax.errors import UserError

PREFIX = "--config."


def resolve(spec: str) -> tuple[str, str]:
    """``(file path, argument)`` of ``spec``: a path to a ``.py`` / ``.json`` file or a shipped config's name,
    optionally followed by ``:arg``."""
    path, _, arg = spec.partition(":")
    if os.path.exists(spec):  # a path that itself holds ':' (rare)
        path, arg = spec, ""
    if not os.path.exists(path) and os.sep not in path and not path.endswith((".py", ".json")):
        try:
            path = configs.path(path)
        except FileNotFoundError as e:
            raise UserError(f"--config {spec!r}: {e}") from None
    if not os.path.exists(path):
        raise UserError(f"--config {spec!r}: {path!r} does not exist; give a config file "
                        "(configs/tiny.py[:arg]), a shipped config name or a .json dump")
    return path, arg


def load(spec: str) -> ml_collections.ConfigDict:
    """The config named by ``spec`` (see the module docstring), locked: a typo in a field name is an error."""
    path, arg = resolve(spec)
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                config = ml_collections.ConfigDict(json.load(f))
        except (OSError, ValueError) as e:
            raise UserError(f"--config {spec!r}: cannot read {path} as a JSON config dump: {e}") from None
    else:
        module_spec = importlib.util.spec_from_file_location("_rre_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # errors inside the config file are bugs there: traceback
        if not hasattr(module, "get_config"):
            raise UserError(f"--config {spec!r}: {path} defines no get_config(arg)")
        try:
            config = module.get_config(arg or None)
        except (KeyError, ValueError) as e:  # a config's own check of its argument (unknown preset, ...)
            raise UserError(f"--config {spec!r}: {e.args[0] if e.args else e}") from None
    config.lock()
    return config


def _parse(key: str, raw: str, current: Any):
    """``raw`` as a value of ``current``'s type (strings stay as written)."""
    if isinstance(current, str) or current is None:
        return raw
    if isinstance(current, bool):
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if raw.lower() not in words:
            raise UserError(f"--config.{key}={raw!r}: expected true or false")
        return words[raw.lower()]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = tuple(s.strip() for s in raw.split(",")) if isinstance(current, (tuple, list)) else raw
    if isinstance(current, (tuple, list)):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(current) and not isinstance(current, (tuple, list)):
        raise UserError(f"--config.{key}={raw!r}: expected a {type(current).__name__} like {current!r}")
    return value


def override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Set the field ``key`` (``a.b.c``) of ``config`` from the command-line text ``raw``."""
    *parents, leaf = key.split(".")
    node = config
    for depth, name in enumerate(parents + [leaf]):
        if not hasattr(node, "keys") or name not in node.keys():
            where = ".".join(["config"] + (parents + [leaf])[:depth])
            fields = sorted(node.keys()) if hasattr(node, "keys") else []
            raise UserError(f"unknown config field --config.{key}: {where} has no field {name!r}; "
                            f"its fields: {fields}")
        if depth < len(parents):
            node = node[name]
    try:  # a locked config accepts new values of existing fields only, type-checked
        node[leaf] = _parse(key, raw, node[leaf])
    except TypeError as e:
        raise UserError(f"--config.{key}={raw!r}: {e}") from None


def split_argv(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``(overrides, rest)``: each ``--config.a.b=v`` / ``--config.a.b v`` as ``('a.b', 'v')``, and the other
    arguments in order. A ``--config.a.b`` with no value is an error."""
    overrides, rest = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg.startswith(PREFIX):
            key, sep, raw = arg[len(PREFIX):].partition("=")
            if not sep:
                if i + 1 >= len(items) or items[i + 1].startswith("--"):
                    raise UserError(f"{arg}: give a value, e.g. {arg}=VALUE")
                raw = items[i + 1]
                i += 1
            overrides.append((key, raw))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def load_with_overrides(spec: str, overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
    """``load(spec)`` with every ``(field, text)`` override applied, in order."""
    config = load(spec)
    for key, raw in overrides:
        override(config, key, raw)
    return config
