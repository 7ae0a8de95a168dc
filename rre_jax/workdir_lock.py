"""One workdir, one run: the lock file a command takes before it writes into a run's workdir.

``<workdir>/rre.lock`` is a small JSON file naming the holder (host, pid, start time, command) that ``rre-train``,
``rre-eval``, ``rre-bon`` and ``rre-alignment-tax`` create before they write anything there and remove when they
end. A second command on a locked workdir gets `WorkdirLocked` (a `UserError`: one line naming the holder and
what to do, exit 2) before it has written a byte, so two runs never interleave ``metrics.jsonl``, ``dev_eval/``
or ``checkpoints/``.

A lock whose holder is gone (SIGKILL, an OOM kill, a preempted VM) is taken over with a warning, so resuming
keeps working. Gone means: on the same host (same boot), no live process with that pid and start time; after a
reboot, a different boot id; from another host (a pod relaunched on new VMs, a workdir on ``gs://``), no
heartbeat for `STALE_AFTER_S`: the holder rewrites the file every `HEARTBEAT_S` from a background thread.

Local workdirs are locked with ``O_CREAT | O_EXCL`` (atomic) and a stale lock is renamed away before the new one
is created, so of two commands that find the same stale lock only one takes it. Remote workdirs go through
``etils.epath``, the filesystem layer orbax writes checkpoints with: object stores offer it no exclusive create,
so the lock is written, read back and kept only if it still holds this process's token (two starts within the
same second can both win there; a run started twice by hand is caught).

A multi-host run takes the lock once: process 0 holds it and tells the other processes whether it got it
(`hold` is a collective when ``jax.process_count() > 1``). Taking a lock this process already holds nests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
from etils import epath
from jax.experimental import multihost_utils

from rre_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "rre.lock"
HEARTBEAT_S = 60.0  # the holder rewrites the lock this often
STALE_AFTER_S = 600.0  # a lock from another host with no heartbeat for this long is taken over

_held: dict[str, "_Lock | None"] = {}  # lock path -> the lock this process holds there (nested `hold`s share it)


class WorkdirLocked(UserError):
    """The workdir is in use by another live command; the message names it and what to do."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock: what ``rre.lock`` records."""

    host: str
    pid: int
    started: str  # UTC, ISO 8601
    command: str
    token: str = ""
    boot_id: str = ""
    proc_start: str = ""  # the process's start time in clock ticks since boot (/proc/<pid>/stat), '' off Linux
    heartbeat: float = 0.0  # time.time() of the holder's last rewrite

    def describe(self) -> str:
        return f"{self.command} (host {self.host}, pid {self.pid}, started {self.started})"


def lock_path(workdir: str) -> epath.Path:
    """``<workdir>/rre.lock`` (local paths absolute; ``gs://...`` as given)."""
    root = str(workdir) if "://" in str(workdir) else os.path.abspath(workdir)
    return epath.Path(root) / LOCK_NAME


def read_holder(workdir: str) -> Holder | None:
    """The holder recorded in ``workdir``'s lock, or None when there is none (or it is unreadable)."""
    return _read(lock_path(workdir))


def holding(command: str):
    """Decorate ``fn(config, workdir, ...)`` to run under `hold` ``(workdir, command)``."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(config, workdir, *args, **kwargs):
            with hold(workdir, command):
                return fn(config, workdir, *args, **kwargs)
        return inner
    return wrap


@contextlib.contextmanager
def hold(workdir: str, command: str):
    """Hold ``workdir``'s lock for the body (released at its end, even on an exception).

    Raises `WorkdirLocked` when another live command holds it. A local workdir the lock had to create is removed
    again at the end when the body left it empty (a command that stops on a user error has written nothing).
    """
    path = lock_path(workdir)
    key = str(path)
    if key in _held:  # this process holds it already (rre-train's command, then train.run): nothing to decide
        yield _held[key].holder if _held[key] is not None else None
        return
    lock, refusal = None, None
    if jax.process_index() == 0:
        try:
            lock = _acquire(path, command)
        except WorkdirLocked as e:
            refusal = e
    if jax.process_count() > 1:  # process 0 tells every process whether the run may go on
        ok = bool(multihost_utils.broadcast_one_to_all(refusal is None))
        if not ok and refusal is None:
            refusal = WorkdirLocked(f"--workdir {workdir} is in use by another command (process 0 of this run "
                                    "names it); wait for it to finish or use another --workdir")
    if refusal is not None:
        raise refusal
    _held[key] = lock  # None on the processes other than 0: they hold it through process 0
    try:
        yield None if lock is None else lock.holder
    finally:
        del _held[key]
        if lock is not None:
            lock.release()


# ----------------------------------------------------------------------------------------------- internals

class _Lock:
    """A lock this process holds: the heartbeat thread and the release."""

    def __init__(self, path: epath.Path, holder: Holder, created: list[str]):
        self.path, self.holder, self.created = path, holder, created
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="rre-workdir-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if _read(self.path) is None or _read(self.path).token != self.holder.token:
                    log.warning("the lock %s no longer names this run; another command may be writing here",
                                self.path)
                    return
                self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
                _write(self.path, self.holder, replace=True)
            except OSError as e:  # a failing heartbeat must not stop training; the run's own writes will say more
                log.warning("could not refresh the lock %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            held = _read(self.path)
            if held is not None and held.token == self.holder.token:
                self.path.unlink()
        except OSError as e:
            log.warning("could not remove the lock %s: %s; remove it by hand before the next run", self.path, e)
        for d in reversed(self.created):  # innermost first; only directories this lock made and nothing filled
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _acquire(path: epath.Path, command: str) -> _Lock:
    me = _me(command)
    created = _missing_dirs(path.parent)
    for _ in range(5):  # a lost race for a stale lock tries again
        current = _read(path)
        for _ in range(10):  # a lock another command is writing right now reads as nothing for a moment
            if current is not None or not _exists(path):
                break
            time.sleep(0.2)
            current = _read(path)
        if current is None and _exists(path):  # damaged: nobody can be said to hold it
            current = Holder(host="?", pid=-1, started="?", command="?")
        if current is not None:
            gone = _gone(current)
            if gone is None:
                raise WorkdirLocked(
                    f"--workdir {path.parent} is in use by {current.describe()} (lock file {path}); wait for it to "
                    f"finish, stop it, or use another --workdir (if that run is gone for certain, delete {path})")
            if not _move_aside(path, current):
                continue
            log.warning("took over the lock %s of %s, which is gone (%s)", path, current.describe(), gone)
        if _create(path, me):
            return _Lock(path, me, created)
    raise WorkdirLocked(f"--workdir {path.parent}: another command keeps taking the lock {path}; retry once it ends")


def _gone(h: Holder) -> str | None:
    """Why the holder ``h`` is gone, or None while it may be alive."""
    if h.pid < 0:
        return "its lock file is unreadable"
    if h.host == socket.gethostname():
        boot = _boot_id()
        if h.boot_id and boot and h.boot_id != boot:
            return "the host has restarted since"
        if not _pid_alive(h.pid, h.proc_start):
            return f"no process {h.pid} on this host"
        return None
    age = time.time() - h.heartbeat
    return f"no heartbeat for {age / 60:.0f} min" if age > STALE_AFTER_S else None


def _pid_alive(pid: int, proc_start: str) -> bool:
    if pid == os.getpid():
        return False  # a lock this very process left behind and no longer tracks (a library user's earlier run)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return not proc_start or _proc_start(pid) in ("", proc_start)  # the same pid reused by a new process: gone


def _proc_start(pid) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _me(command: str) -> Holder:
    now = time.time()
    return Holder(host=socket.gethostname(), pid=os.getpid(),
                  started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), command=command,
                  token=uuid.uuid4().hex, boot_id=_boot_id(), proc_start=_proc_start("self"), heartbeat=now)


def _missing_dirs(directory: epath.Path) -> list[str]:
    """The local directories, outermost first, that creating ``directory`` will make."""
    if not _local(directory):
        return []
    out, d = [], os.path.abspath(str(directory))
    while not os.path.exists(d):
        out.insert(0, d)
        d = os.path.dirname(d)
    return out


def _local(path: epath.Path) -> bool:
    return "://" not in str(path)


def _exists(path: epath.Path) -> bool:
    return path.exists()


def _read(path: epath.Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(**{f.name: data[f.name] for f in dataclasses.fields(Holder) if f.name in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write(path: epath.Path, holder: Holder, *, replace: bool) -> None:
    text = json.dumps(dataclasses.asdict(holder), indent=1) + "\n"
    if _local(path) and replace:
        tmp = f"{path}.{holder.token}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, str(path))
    else:
        path.write_text(text)


def _create(path: epath.Path, holder: Holder) -> bool:
    """Create the lock for ``holder``; False when another command created it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dataclasses.asdict(holder), indent=1) + "\n"
    if _local(path):
        try:
            fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if path.exists():
        return False
    path.write_text(text)  # no exclusive create on object stores: write, then check it is still ours
    held = _read(path)
    return held is not None and held.token == holder.token


def _move_aside(path: epath.Path, stale: Holder) -> bool:
    """Remove a stale lock (renamed first, locally, so only one of two racing takers succeeds)."""
    try:
        if _local(path):
            aside = f"{path}.stale.{uuid.uuid4().hex}"
            os.rename(str(path), aside)
            os.remove(aside)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return False
