"""Full-state orbax checkpoints of a run, with automatic resume.

A checkpoint holds two items:

* ``state``: the array pytree of the run (params, LoRA, optimizer state, KL controller, score moments,
  RNG key, ...), saved with ``StandardSave`` and restored *into the shardings of an abstract target*, so a
  run resumes on any mesh the target describes;
* ``meta``: a JSON dict (step, data-iterator position, the config as JSON, versions).

Orbax writes each step into a temporary directory and renames it only once complete, so a process killed
during a write leaves the previous checkpoint intact; ``cleanup_tmp_directories`` removes the debris on the
next start. Saves are synchronous by default so that a SIGKILL right after ``save`` returns cannot lose it.

A damaged checkpoint (a data file cut short by a failing disk or a bad copy between buckets, a metadata file
that no longer parses) is not the end of a run: `restore_newest_intact` tries the steps newest first, moves each
damaged one aside to ``checkpoints/damaged/<step>`` (never deletes it) with one warning line naming the step and
the file, and restores the newest intact one; none intact is a `UserError` listing them, and nothing is moved.
A read error is told from a checkpoint that does not fit the run (a changed config), which is still raised as
it is. A save that the disk or the bucket refuses (full, read-only, no permission) raises `CheckpointWriteError`
(an ``OSError``) naming the path; `write_failure` turns any such ``OSError`` of a run into one line that also
names the newest checkpoint that is still intact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from rre_jax.errors import UserError

log = logging.getLogger(__name__)

DAMAGED_DIR = "damaged"  # checkpoints/damaged/<step>: steps moved aside, kept for inspection


@dataclasses.dataclass(frozen=True)
class Damage:
    """A checkpoint step that cannot be read: the step, the damaged file (the step's directory when the reader
    does not say which) and the reader's complaint."""

    step: int
    file: str
    reason: str

    def describe(self) -> str:
        return f"checkpoint step {self.step} is damaged: {self.file}: {self.reason}"


class DamagedCheckpoint(UserError):
    """A restore that met damaged bytes; ``damage`` says where. One line: the step, the file, the complaint."""

    def __init__(self, damage: Damage):
        super().__init__(f"{damage.describe()} (restore the step from a copy, or choose another step)")
        self.damage = damage


class CheckpointWriteError(OSError):
    """A checkpoint write the storage refused (disk full, read-only, permission, a bucket's refusal)."""


def damage_of(error: BaseException, step: int, step_dir: str) -> Damage | None:
    """The `Damage` an exception raised by a restore of ``step`` reveals, or None when it is not a read of
    damaged bytes (a target that does not fit, a bug): such errors are for the caller to raise."""
    chain = _chain(error)
    if not any(isinstance(e, (json.JSONDecodeError, FileNotFoundError, EOFError)) or _READ_ERROR.search(str(e))
               for e in chain):
        return None
    inner = str(chain[-1]).strip().splitlines()[0]
    return Damage(step, _damaged_file(str(step_dir), chain), inner[:300])


class CheckpointManager:
    """Thin wrapper over ``ocp.CheckpointManager`` for ``(state, meta)`` checkpoints in ``workdir/checkpoints``."""

    def __init__(self, workdir: str, max_to_keep: int | None = None, async_save: bool = False):
        root = workdir if "://" in str(workdir) else os.path.abspath(workdir)  # gs:// paths stay as they are
        self.directory = epath.Path(root) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write ``(state, meta)`` as ``step``; a write the storage refuses raises `CheckpointWriteError`."""
        try:
            with _orbax_errors_to_log_file():
                self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=True)
                self._mngr.wait_until_finished()
        except Exception as e:
            refused = next((x for x in _chain(e) if isinstance(x, OSError) or _WRITE_ERROR.search(str(x))), None)
            if refused is None:
                raise
            if isinstance(refused, OSError) and refused.filename:
                raise CheckpointWriteError(refused.errno, refused.strerror, refused.filename) from e
            paths = re.findall(r'"(/[^"]+|[a-z0-9]+://[^"]+)"', str(refused))
            code = re.search(r"os_error_code='?(\d+)", str(refused))
            num = int(code.group(1)) if code else errno.EIO
            raise CheckpointWriteError(num, os.strerror(num) if code else str(refused).splitlines()[0],
                                       paths[-1] if paths else str(self.directory / str(step))) from e

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore ``step`` into the shapes, dtypes and shardings of ``abstract_state``."""
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available: {self.all_steps() or 'none'}")
        abstract = jax.tree.map(_as_abstract, abstract_state)
        try:
            with _orbax_errors_to_log_file():
                out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                        meta=ocp.args.JsonRestore()))
        except Exception as e:
            damage = damage_of(e, step, self._step_dir(step))
            if damage is None:
                raise
            _quiet_abandoned_reads()
            raise DamagedCheckpoint(damage) from e
        return out.state, dict(out.meta)

    def restore_meta(self, step: int) -> dict:
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def newest_meta(self) -> tuple[int, dict] | None:
        """``(step, meta)`` of the newest step whose meta reads (damaged ones are skipped, not moved); None when
        there is no checkpoint."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore_meta(step)
            except Exception as e:
                if damage_of(e, step, self._step_dir(step)) is None:
                    raise
        return None

    def restore_checked(self, step: int, abstract_state: Any) -> tuple[Any, dict] | Damage:
        """`restore`, or the `Damage` that stops it (every process agrees: a step damaged anywhere is damaged)."""
        try:
            out, damage = self.restore(step, abstract_state), None
        except DamagedCheckpoint as e:
            out, damage = None, e.damage
        if jax.process_count() > 1:
            damaged_anywhere = multihost_utils.process_allgather(np.array(damage is not None)).any()
            if damaged_anywhere and damage is None:
                damage = Damage(step, self._step_dir(step), "damaged as another process read it")
        return out if damage is None else damage

    def restore_newest_intact(self, abstract_state: Any) -> tuple[int, Any, dict]:
        """``(step, state, meta)`` of the newest checkpoint that restores; each newer, damaged step is moved aside
        to ``checkpoints/damaged/<step>`` with a warning. Raises `UserError` (nothing moved) when none restores."""
        damaged: list[Damage] = []
        for step in reversed(self.all_steps()):
            got = self.restore_checked(step, abstract_state)
            if not isinstance(got, Damage):
                for d in damaged:
                    where = self.move_aside(d.step)
                    log.warning("%s; moved to %s, resuming from step %d", d.describe(), where, step)
                return step, *got
            damaged.append(got)
        raise UserError(f"no intact checkpoint in {self.directory}: " + "; ".join(d.describe() for d in damaged)
                        + "; nothing was moved: restore the files from a copy, or start a new --workdir")

    def move_aside(self, step: int) -> str:
        """Move step ``step`` to ``checkpoints/damaged/<step>`` (``<step>.1``, ... when taken); returns the path."""
        aside = self.directory / DAMAGED_DIR
        target, n = aside / str(step), 0
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            while target.exists():
                n += 1
                target = aside / f"{step}.{n}"
            epath.Path(self._step_dir(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self._mngr.reload()
        return str(target)

    def remove(self, step: int) -> None:
        """Delete step ``step`` (a save that is not to be resumed: a sweep's step some member did not save)."""
        if jax.process_index() == 0:
            epath.Path(self._step_dir(step)).rmtree()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} removed")
        self._mngr.reload()

    def _step_dir(self, step: int) -> str:
        return str(self.directory / str(step))

    def close(self) -> None:
        self._mngr.close()


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


# ----------------------------------------------------------------------------------------------- reading errors

# What tensorstore and orbax say when bytes on disk are missing, cut short or garbled (as opposed to a target that
# does not fit, which says "shape" / "structure" and is not damage).
_READ_ERROR = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b|Error (reading|decoding|opening) .*(file|OCDBT)"
                         r"|Encountered error while reading")
# What they say when the storage refuses a write.
_WRITE_ERROR = re.compile(r"\b(RESOURCE_EXHAUSTED|PERMISSION_DENIED)\b|os_error_code=")


def _chain(error: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while error is not None and id(error) not in seen:
        out.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return out


def _damaged_file(step_dir: str, chain: list[BaseException]) -> str:
    """The file a read error points at: a file the message names; else, for a byte range read past the end of a
    value of size n, the file of that size under the database the message names; else a JSON file of the step
    that no longer parses; else the step's directory."""
    text = " ".join(str(e) for e in chain)
    named = [p for p in re.findall(r'"([^"]+)"', text) if p.startswith(step_dir) and os.path.isfile(p)]
    if named:
        return named[-1]
    size = re.search(r"not valid for value of size (\d+)", text)
    base = re.findall(r'OCDBT database at (?:local file )?"([^"]+)"', text)
    if size and base and os.path.isdir(base[-1]):
        for root, _, files in os.walk(base[-1]):
            for name in files:
                if os.path.getsize(os.path.join(root, name)) == int(size.group(1)):
                    return os.path.join(root, name)
    if os.path.isdir(step_dir):
        for root, _, files in os.walk(step_dir):
            for name in files:
                if name in ("metadata", "_METADATA", "_CHECKPOINT_METADATA", "_sharding"):
                    try:
                        with open(os.path.join(root, name)) as f:
                            json.load(f)
                    except (OSError, ValueError):
                        return os.path.join(root, name)
    return step_dir


class _ToLogFile(logging.Filter):
    """Orbax logs the traceback of a failed read or write at ERROR before it raises; the raised error is reported
    (one line) by the caller, so the logged copy goes to the log file only: its level becomes INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


@contextlib.contextmanager
def _orbax_errors_to_log_file():
    absl = logging.getLogger("absl")
    f = _ToLogFile()
    absl.addFilter(f)
    try:
        yield
    finally:
        absl.removeFilter(f)


def write_failure(error: OSError, workdir: str) -> str:
    """One line for a write the storage refused during a run: the path, the reason and the newest checkpoint
    that is intact (complete steps only: orbax renames a step into place once all of it is written)."""
    root = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir)) / "checkpoints"
    try:
        steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    except OSError:
        steps = []
    where = (f"the newest intact checkpoint is step {steps[-1]} ({root / str(steps[-1])}): make room (or fix the "
             "permission), then rerun the same command to resume from it" if steps else
             "no checkpoint was saved yet: make room (or fix the permission) and rerun the same command")
    return f"could not write {error.filename or workdir}: {error.strerror or error}; {where}"


def _abandoned_read(unraisable) -> bool:
    """An exception nobody can catch from one of orbax's reads of a damaged checkpoint: the restore failed and its
    event loop closed, then a read still in flight finished and asyncio could not post its result
    (``call_soon_threadsafe``: "Event loop is closed"), or a read coroutine is collected holding its read error
    ("Encountered error while reading array index"). The damage was already reported; nothing is lost."""
    exc, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:  # an orbax read coroutine collected with its read error
        return True
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _OrbaxLateErrors(_ToLogFile):
    """Orbax's own error logs (with tracebacks) of reads it abandoned, which its threads may write after the restore
    has already failed and been reported: to the log file, like the ones logged before it raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        return super().filter(record) if "orbax" in record.pathname else True


def _quiet_abandoned_reads() -> None:
    """After a damaged checkpoint, keep the abandoned reads' late errors off the console, so the damage is one
    warning line: orbax's late error logs go to the log file (``_OrbaxLateErrors``) and asyncio's "Event loop is
    closed" (``_abandoned_read``) is dropped; every other unraisable exception goes to the hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "rre_abandoned_reads", False):
        return
    logging.getLogger("absl").addFilter(_OrbaxLateErrors())

    def hook(unraisable):
        if not _abandoned_read(unraisable):
            previous(unraisable)
    hook.rre_abandoned_reads = True
    sys.unraisablehook = hook
