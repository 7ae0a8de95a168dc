"""User errors: a mistake in a config, a data file or a path, as opposed to a bug.

Library code raises ``UserError`` (or a subclass) with a message that names the file, line or field and the fix.
Every command catches it at its top level, prints ``<command>: error: <message>`` on one line and exits 2, without
a traceback; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake the user can fix (config field, data file, path); the message says where and how."""


def one_of(field: str, value, choices, meaning: str = ""):
    """``value`` when it is among ``choices``, else a `UserError` naming ``field``, the choices and ``meaning``."""
    if value not in choices:
        raise UserError(f"{field}={value!r}; choose one of {tuple(choices)}" + (f" ({meaning})" if meaning else ""))
    return value


def report(command: str, error: BaseException) -> int:
    """Print ``error`` as one line on stderr for ``command`` and return the exit status for user errors."""
    print(f"{command}: error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


def exits_cleanly(command: str, catch: tuple[type[BaseException], ...] = (UserError,)) -> Callable:
    """Decorate a command's ``main``: the exceptions in ``catch`` become one line on stderr and exit status 2."""
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def inner(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except catch as e:
                sys.exit(report(command, e))
        return inner
    return wrap
