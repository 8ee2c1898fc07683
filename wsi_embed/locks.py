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
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import LockLost  # noqa: F401  (re-exported: it is raised about these locks)

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 3600.0  # seconds without a heartbeat before another host's lock is stale
HEARTBEAT_EVERY = 60.0
_UNREADABLE_GRACE = 30.0  # a lock file being written right now may still be empty
_GUARD_EXPIRES = 30.0  # a takeover takes milliseconds; an older guard was left by a dead process


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_owner(path: Path) -> LockOwner | None:
    try:
        data = json.loads(path.read_text())
        return LockOwner(str(data["host"]), int(data["pid"]), float(data["started"]), str(data["token"]),
                         data.get("proc_start"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class SlideLock:
    """A held lock. Release it with :meth:`release` (idempotent)."""

    def __init__(self, path: Path, owner: LockOwner):
        self.path = path
        self.owner = owner
        self._last_beat = time.monotonic()
        self.released = False

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
        os.write(fd, (json.dumps(payload) + "\n").encode())
    finally:
        os.close(fd)
    return SlideLock(path, owner)


def stale_reason(path: Path, owner: LockOwner | None, stale_after: float) -> str | None:
    """Why the lock at ``path`` (owned by ``owner``, None if unreadable) is stale; None if live."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    if owner is None:
        return f"unreadable for {age:.0f} s" if age > _UNREADABLE_GRACE else None
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
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    finally:
        try:
            guard.unlink()
        except FileNotFoundError:
            pass


def try_lock(out_dir: str | os.PathLike, slide_id: str, *,
             stale_after: float = DEFAULT_STALE_AFTER) -> tuple[SlideLock | None, LockOwner | None]:
    """Take the slide's lock without waiting.

    Returns ``(lock, None)`` when taken, or ``(None, owner)`` when a live process holds it
    (``owner`` may be None when its file is still being written).
    """
    path = lock_path(out_dir, slide_id)
    for _ in range(40):  # each round takes the lock, finds a live owner, or clears a stale one
        lock = _create(path)
        if lock is not None:
            return lock, None
        owner = _read_owner(path)
        reason = stale_reason(path, owner, stale_after)
        if reason is None:
            return None, owner
        if reason != "gone":
            log.info("%s: taking over stale lock (%s)", path, reason)
            _take_over(path, owner, stale_after)
    return None, _read_owner(path)
