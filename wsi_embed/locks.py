"""Per-slide lock files, so several processes (or SLURM tasks on several hosts) can share one
cohort and one output directory without embedding a slide twice or trampling a store.

A lock is ``<out>/.<slide_id>.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local file
systems and NFSv3+). It holds one JSON line: host, pid, the pid's start time, when it was taken,
and a random token that identifies this acquisition. Recovery from owners that died:

- same host: the owner is dead when its pid is gone, or the pid now belongs to a younger process
  (pid reuse); its lock is stale at once;
- another host: we cannot see its processes, so the lock is stale when it has not been refreshed
  (:meth:`SlideLock.heartbeat`, which touches the file) for ``stale_after`` seconds.

A stale lock is removed by one contender at a time (see :func:`_take_over`); then the usual
``O_EXCL`` create decides who owns the slide.

A malformed lock (a pid that cannot be a process: 0, negative, huge) was not written by this
tool and is stale at once, whoever the host; so is an empty directory at the lock's path (it is
removed). A non-empty directory there is not ours to delete: :class:`LockPathBlocked` names it.
Errors about one slide's lock (:class:`LockError`) fail that slide, not the run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidOption, WsiEmbedError
from .ids import MAX_ID_BYTES, id_bytes

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 3600.0  # seconds without a heartbeat before another host's lock is stale
HEARTBEAT_EVERY = 60.0
MIN_STALE_AFTER = 2 * HEARTBEAT_EVERY  # the least --lock-stale-after that leaves a live run its locks
_UNREADABLE_GRACE = 30.0  # a lock file being written right now may still be empty
_GUARD_EXPIRES = 30.0  # a takeover takes milliseconds; an older guard was left by a dead process
_PID_LIMIT = 1 << 31  # pids are positive C ints on every system we might share a folder with


class LockError(WsiEmbedError, OSError):
    """This slide's lock cannot be created: fail this slide, the others go on.

    An ``OSError`` whose ``errno`` is the cause (ENAMETOOLONG, ENOTEMPTY) and whose ``str`` and
    ``strerror`` are the one-line message."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno, self.strerror = code, message

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LockNameTooLong(LockError):
    """The lock's file name is too long (ENAMETOOLONG): the slide id is too long."""


class LockPathBlocked(LockError):
    """Something that is not a lock file (a non-empty directory) sits at the lock's path."""


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    started: float  # unix time the lock was taken
    token: str
    proc_start: int | None = None  # the owner's process start time (clock ticks since boot)

    def describe(self) -> str:
        return f"{self.host}:{self.pid}"


def lock_path(out_dir: str | os.PathLike, slide_id: str) -> Path:
    return Path(out_dir) / f".{slide_id}.lock"


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from its owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces or ')'
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    if not 0 < pid < _PID_LIMIT:  # kill(0) and kill(-1) signal groups: they say nothing of one pid
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_owner(path: Path) -> LockOwner | None:
    """The lock's owner; None while unreadable. A malformed pid is kept (see :func:`_malformed`)."""
    try:
        data = json.loads(path.read_text())
        proc_start = data.get("proc_start")
        if not isinstance(proc_start, int) or isinstance(proc_start, bool):
            proc_start = None
        return LockOwner(str(data["host"]), int(data["pid"]), float(data["started"]), str(data["token"]),
                         proc_start)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None


def _malformed(owner: LockOwner) -> str | None:
    """Why ``owner`` cannot have been written by a live run of this tool (bad pid), or None."""
    if not 0 < owner.pid < _PID_LIMIT:
        return f"malformed (pid {owner.pid})"
    return None


class SlideLock:
    """A held lock. Release it with :meth:`release` (idempotent)."""

    def __init__(self, path: Path, owner: LockOwner):
        self.path = path
        self.owner = owner
        self._last_beat = time.monotonic()
        self.released = False
        self.took_over = False  # taken from an owner judged dead, who may have left work half done

    def held(self) -> bool:
        """True while the lock file is still ours (nobody judged us dead and took it over)."""
        current = _read_owner(self.path)
        return current is not None and current.token == self.owner.token

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the lock's mtime (at most every ``HEARTBEAT_EVERY`` s) so other hosts see it live."""
        now = time.monotonic()
        if self.released or (not force and now - self._last_beat < HEARTBEAT_EVERY):
            return
        self._last_beat = now
        try:
            os.utime(self.path)
        except OSError as exc:  # the slide's own commit check will notice a lost lock
            log.warning("could not refresh lock %s: %s", self.path, exc)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        # Only remove the file if it is still ours: after a takeover it belongs to someone else.
        if self.held():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        else:
            log.warning("lock %s was taken over by another process before release", self.path)

    def __enter__(self) -> "SlideLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create(path: Path) -> SlideLock | None:
    """One O_EXCL attempt; None when the file exists."""
    host, pid = socket.gethostname(), os.getpid()
    owner = LockOwner(host, pid, time.time(), uuid.uuid4().hex, _proc_start(pid))
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    try:
        payload = {"host": owner.host, "pid": owner.pid, "started": owner.started,
                   "started_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(owner.started)),
                   "token": owner.token, "proc_start": owner.proc_start}
        data = (json.dumps(payload) + "\n").encode()
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, "short write to the lock file")
    except BaseException:
        os.close(fd)
        try:  # an empty lock would block the slide for everyone during the unreadable grace
            path.unlink()
        except OSError:
            pass
        raise
    os.close(fd)
    return SlideLock(path, owner)


def stale_reason(path: Path, owner: LockOwner | None, stale_after: float) -> str | None:
    """Why the lock at ``path`` (owned by ``owner``, None if unreadable) is stale; None if live."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "gone"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a lock file"
    age = time.time() - st.st_mtime
    if owner is None:
        return f"unreadable for {age:.0f} s" if age > _UNREADABLE_GRACE else None
    malformed = _malformed(owner)
    if malformed:
        return malformed
    if owner.host == socket.gethostname():
        if not _pid_alive(owner.pid):
            return f"owner {owner.describe()} is not running"
        if owner.proc_start is not None:
            now_start = _proc_start(owner.pid)
            if now_start is not None and now_start != owner.proc_start:
                return f"pid {owner.pid} now belongs to another process"
        return None
    if age > stale_after:
        return f"owner {owner.describe()} has not refreshed it for {age:.0f} s (> {stale_after:.0f} s)"
    return None


def _take_over(path: Path, judged: LockOwner | None, stale_after: float) -> None:
    """Remove the stale lock ``judged``, unless it changed meanwhile.

    Contenders serialize on ``<lock>.takeover`` (itself an O_EXCL file): the one holding it checks
    that the lock is still the stale one and unlinks it; a live lock can only appear after that,
    by O_EXCL, so no contender ever removes a live lock. A guard left by a process that died
    within those few milliseconds expires after ``_GUARD_EXPIRES`` seconds.
    """
    guard = path.with_name(f"{path.name}.takeover")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > _GUARD_EXPIRES:
                guard.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.05)  # someone else is taking it over: look again shortly
        return
    try:
        current = _read_owner(path)
        same = (current is None and judged is None) or (
            current is not None and judged is not None and current.token == judged.token)
        if same and stale_reason(path, current, stale_after) is not None:
            _remove_lock(path)
    finally:
        try:
            guard.unlink()
        except FileNotFoundError:
            pass


def _remove_lock(path: Path) -> None:
    """Unlink a stale lock; an empty directory in its place is removed, a non-empty one is refused."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError):  # Linux says EISDIR, macOS EPERM for a folder
        if not path.is_dir():
            raise
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as rm_exc:
            if rm_exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise LockPathBlocked(
                    f"{path}: a directory with files in it sits where this slide's lock file goes; "
                    "move or remove it, then rerun", errno.ENOTEMPTY) from None
            raise
        log.info("%s: removed an empty directory at the lock's path", path)


def held_by_a_live_run(out_dir: str | os.PathLike, slide_id: str, stale_after: float = DEFAULT_STALE_AFTER) -> bool:
    """The slide's lock exists and its owner is alive (not stale)."""
    path = lock_path(out_dir, slide_id)
    return path.exists() and stale_reason(path, _read_owner(path), stale_after) is None


def try_lock(out_dir: str | os.PathLike, slide_id: str, *,
             stale_after: float = DEFAULT_STALE_AFTER) -> tuple[SlideLock | None, LockOwner | None]:
    """Take the slide's lock without waiting.

    Returns ``(lock, None)`` when taken, or ``(None, owner)`` when a live process holds it
    (``owner`` may be None when its file is still being written).
    """
    try:
        positive = float(stale_after) > 0  # False for NaN
    except (TypeError, ValueError):
        positive = False
    if not positive:
        raise InvalidOption(f"--lock-stale-after must be a positive number of seconds, got {stale_after}")
    path = lock_path(out_dir, slide_id)
    took_over = False
    for _ in range(40):  # each round takes the lock, finds a live owner, or clears a stale one
        try:
            lock = _create(path)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise LockNameTooLong(
                    f"cannot create the lock for slide {slide_id[:40]}...: its id is {id_bytes(slide_id)} bytes, "
                    f"too long for a file name (max {MAX_ID_BYTES}); give it a shorter id with --list and a "
                    "slide_id column", errno.ENAMETOOLONG) from exc
            raise
        if lock is not None:
            lock.took_over = took_over
            return lock, None
        owner = _read_owner(path)
        reason = stale_reason(path, owner, stale_after)
        if reason is None:
            return None, owner
        if reason != "gone":
            log.info("%s: taking over stale lock (%s)", path, reason)
            _take_over(path, owner, stale_after)
            took_over = True
    return None, _read_owner(path)
