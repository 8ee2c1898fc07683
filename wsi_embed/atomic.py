"""Temporary names and atomic file writes: one place owns the temp name, the rename and the cleanup.

Every temporary is ``.<final name><TMP_MARK><host>-<pid>-<hex>``: it starts with a dot (no reader's
glob for ``*.h5`` or ``*.png`` sees it, and slide ids never start with one) and names its owner, so a
later run can tell a dead writer's leftovers (:func:`owner_gone`) from a live writer's work.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import stat
import uuid
from pathlib import Path
from typing import Callable

TMP_MARK = ".tmp-"


def tmp_suffix() -> str:
    return f"{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def tmp_path_for(path: Path, infix: str = "") -> Path:
    """A temporary beside ``path`` (``infix``: ``.old``, ``.bad``, ... for the other kinds)."""
    return path.with_name(f".{path.name}{infix}{tmp_suffix()}")


def owner_gone(name: str) -> bool:
    """For a temporary named by :func:`tmp_suffix`: its process, on this host, has ended."""
    try:
        host, pid, _ = name.rsplit(TMP_MARK, 1)[1].rsplit("-", 2)
        pid = int(pid)
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname():
        return False  # cannot tell: left for a run on that host
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)``, then rename onto ``path``: a reader never sees half a file, and a failed or
    interrupted write (full disk, Ctrl-C) leaves nothing behind."""
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``final``; an existing ``final`` is first renamed
    aside (a dotted ``.old`` temporary) and removed after, so ``final`` is always whole."""
    if final.exists():
        trash = tmp_path_for(final, ".old")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def append_whole(path: Path, encode: Callable[[int], bytes]) -> None:
    """Append ``encode(size)`` (``size``: the file's length before, so a header can go first) as one
    whole record, under an exclusive lock: concurrent writers never interleave; a record after a last
    line cut short (a full disk, a copy cut off) starts on a line of its own; a failed write (full
    disk, quota) is truncated back, so no half record glues itself to the next one."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            data = encode(size)
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                _truncate(fd, size)
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _truncate(fd: int, size: int) -> None:
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
    except OSError:
        pass
