"""What a command prints: its progress bars, warnings and errors, and a closing summary; the rest goes to a file.

``log_to_file(path)`` routes every INFO record (rre_jax's own, absl's, orbax's, jax's) to ``path`` and lets
only warnings and errors through to the console (stderr), so a run's console is its progress bar and the
summary its command prints at the end. ``train_summary(workdir)`` is that summary for ``rre-train``, read back
from what the run wrote (``metrics.jsonl``, ``checkpoints/``, ``dev_eval/``, ``export/``), so it is the
same whether the run just finished or ended earlier.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

from rre_jax import metrics

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_path(workdir: str, name: str) -> str:
    """``workdir/name``; for a workdir on remote storage (``gs://...``), a local file named after the process."""
    if "://" in workdir:
        return os.path.join(tempfile.gettempdir(), f"{os.path.splitext(name)[0]}.{os.getpid()}.log")
    return os.path.join(workdir, name)


def log_to_file(path: str) -> str:
    """INFO and up to ``path`` (appended), WARNING and up to stderr; returns ``path``.

    absl logs through the ``absl`` logger, which propagates to the root. The handlers a previous call added and
    plain console handlers (``logging.basicConfig``'s) are replaced; others (a test harness's) are kept.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter(_FORMAT))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_rre_console", False) or _prints_to_console(handler):
            root.removeHandler(handler)
            handler.close()  # a StreamHandler leaves its stream open
    for handler in (to_file, to_console):
        handler._rre_console = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.raiseExceptions = False  # a full disk must not print a traceback per log line; the command reports it
    logging.captureWarnings(True)  # warnings.warn -> the 'py.warnings' logger: file and console
    return path


def _prints_to_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout)


def _first_last(rows: list[dict], key: str) -> tuple[int, float, int, float] | None:
    seen = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return (*seen[0], *seen[-1]) if seen else None


def _trend(rows: list[dict], key: str, label: str) -> str | None:
    got = _first_last(rows, key)
    if got is None:
        return None
    s0, v0, s1, v1 = got
    return f"  {label:<22} {v0:9.4f} (step {s0}) -> {v1:9.4f} (step {s1})"


def _where(workdir: str, name: str, what: str) -> str | None:
    path = os.path.join(workdir, name)
    return f"  {what:<22} {path}" if os.path.exists(path) else None


def train_summary(workdir: str, *, command: str = "rre-train", log_file: str = "", eval_set: str = "") -> str:
    """The closing lines of ``rre-train``: steps, proxy and gold first -> last, where the outputs are, next."""
    rows = metrics.read_metrics(workdir)
    steps = [r["step"] for r in rows if r.get("reward/proxy") is not None]
    saves = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                   if d.isdigit()) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    lines = [f"{command}: {len(steps)} steps logged (last step {steps[-1] if steps else 0}) in {workdir}"]
    lines += filter(None, [
        _trend(rows, "reward/proxy", "proxy (train batch)"),
        _trend(rows, "eval/proxy", "proxy (dev eval)"),
        _trend(rows, "eval/gold", "gold (dev eval)"),
        f"  {'checkpoints':<22} {os.path.join(workdir, 'checkpoints')} (steps {', '.join(map(str, saves))})"
        if saves else None,
        _where(workdir, "metrics.jsonl", "metrics"),
        _where(workdir, "tensorboard", "tensorboard"),
        _where(workdir, os.path.join("dev_eval", "report.md"), "dev-eval report"),
        _where(workdir, "export", "exported policy"),
        f"  {'log':<22} {log_file}" if log_file else None,
    ])
    lines.append(f"next: rre-eval --workdir {workdir} --eval-set {eval_set or 'EVAL.json'}"
                 "   (proxy and gold of every checkpoint, and their monotonicity)")
    return "\n".join(lines)
