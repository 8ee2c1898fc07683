"""Per-slide lock files: exclusive, recoverable from dead owners, never stolen from live ones."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from wsi_embed import locks
from wsi_embed.locks import lock_path, try_lock


def write_lock(path, *, host=None, pid=None, proc_start=None, age=0.0, token="t0"):
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid or os.getpid(),
                                "started": time.time() - age, "token": token, "proc_start": proc_start}))
    if age:
        past = time.time() - age
        os.utime(path, (past, past))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_exclusive_and_released(tmp_path):
    lock, owner = try_lock(tmp_path, "s1")
    assert lock is not None and owner is None
    data = json.loads(lock_path(tmp_path, "s1").read_text())
    assert data["host"] == socket.gethostname() and data["pid"] == os.getpid() and data["started"]
    again, owner = try_lock(tmp_path, "s1")  # held by a live process (this one)
    assert again is None and owner.describe() == f"{socket.gethostname()}:{os.getpid()}"
    lock.release()
    lock.release()  # idempotent
    assert not lock_path(tmp_path, "s1").exists()
    lock2, _ = try_lock(tmp_path, "s1")
    assert lock2 is not None
    lock2.release()


def test_dead_owner_on_this_host_is_taken_over(tmp_path):
    path = lock_path(tmp_path, "s")
    write_lock(path, pid=dead_pid())
    lock, owner = try_lock(tmp_path, "s")
    assert lock is not None and lock.held()
    lock.release()


def test_reused_pid_is_not_the_owner(tmp_path):
    # The recorded pid is alive (it is ours) but belonged to a process that started at another time.
    path = lock_path(tmp_path, "s")
    write_lock(path, pid=os.getpid(), proc_start=locks._proc_start(os.getpid()) + 12345)
    lock, _ = try_lock(tmp_path, "s")
    assert lock is not None
    lock.release()


def test_other_host_stale_only_after_age(tmp_path):
    path = lock_path(tmp_path, "s")
    write_lock(path, host="elsewhere", pid=1, age=100)
    lock, owner = try_lock(tmp_path, "s", stale_after=3600)
    assert lock is None and owner.describe() == "elsewhere:1"
    lock, _ = try_lock(tmp_path, "s", stale_after=50)
    assert lock is not None
    lock.release()


def test_heartbeat_keeps_a_lock_fresh(tmp_path):
    lock, _ = try_lock(tmp_path, "s")
    path = lock_path(tmp_path, "s")
    past = time.time() - 1000
    os.utime(path, (past, past))
    lock.heartbeat(force=True)
    assert time.time() - path.stat().st_mtime < 60
    lock.release()


def test_unreadable_lock_gets_a_grace_period(tmp_path):
    path = lock_path(tmp_path, "s")
    path.write_text("")  # its owner is between O_EXCL and write
    assert try_lock(tmp_path, "s")[0] is None
    past = time.time() - 3600
    os.utime(path, (past, past))
    lock, _ = try_lock(tmp_path, "s")
    assert lock is not None
    lock.release()


def test_release_does_not_remove_a_successors_lock(tmp_path):
    lock, _ = try_lock(tmp_path, "s")
    path = lock_path(tmp_path, "s")
    write_lock(path, host="elsewhere", pid=7, token="theirs")  # as if we had been taken over
    assert not lock.held()
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"


def _contend(out_dir, start, results, hold):
    start.wait()
    lock, _ = try_lock(out_dir, "s")
    results.put(lock is not None)
    hold.wait()  # keep it until every contender has tried
    if lock is not None:
        lock.release()


@pytest.mark.parametrize("round_", range(5))
def test_one_winner_among_concurrent_takeovers(tmp_path, round_):
    write_lock(lock_path(tmp_path, "s"), pid=dead_pid())
    ctx = multiprocessing.get_context("fork")
    n = 8
    start, hold, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(tmp_path, start, results, hold)) for _ in range(n)]
    for p in procs:
        p.start()
    wins = [results.get(timeout=30) for _ in range(n)]
    for p in procs:
        p.join(timeout=30)
    assert sum(wins) == 1
    assert not list(tmp_path.glob("*.takeover"))


# -- malformed locks, odd paths, bad settings ----------------------------------------------------
@pytest.mark.parametrize("pid", [0, -1, -7, 2**40])
@pytest.mark.parametrize("host", [None, "elsewhere"])
def test_malformed_pid_is_stale_at_once(tmp_path, pid, host):
    """kill(0) and kill(-1) 'succeed' (they signal groups): such a lock used to block forever."""
    path = lock_path(tmp_path, "s")
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": time.time(),
                                "token": "bad"}))  # fresh: no age-based staleness can apply
    lock, owner = try_lock(tmp_path, "s")
    assert lock is not None and owner is None and lock.held()
    lock.release()
    assert not path.exists() and not list(tmp_path.glob("*.takeover"))


def test_empty_directory_at_the_lock_path_is_removed(tmp_path):
    path = lock_path(tmp_path, "s")
    path.mkdir()
    lock, _ = try_lock(tmp_path, "s")
    assert lock is not None and path.is_file()
    lock.release()


def test_non_empty_directory_at_the_lock_path_is_a_clear_error(tmp_path):
    from wsi_embed.errors import WsiEmbedError

    path = lock_path(tmp_path, "s")
    path.mkdir()
    (path / "keep.txt").write_text("someone's data")
    with pytest.raises(locks.LockPathBlocked) as info:
        try_lock(tmp_path, "s")
    err = info.value
    assert isinstance(err, locks.LockError) and isinstance(err, WsiEmbedError) and isinstance(err, OSError)
    assert str(path) in str(err) and "\n" not in str(err) and str(err).startswith(str(path))
    assert (path / "keep.txt").read_text() == "someone's data"
    assert not list(tmp_path.glob("*.takeover"))


@pytest.mark.parametrize("value", [0, -5, float("nan"), "soon"])
def test_lock_stale_after_must_be_positive(tmp_path, value):
    from wsi_embed.errors import InvalidOption

    with pytest.raises(InvalidOption, match="--lock-stale-after must be a positive"):
        try_lock(tmp_path, "s", stale_after=value)
    assert not lock_path(tmp_path, "s").exists()


def test_too_long_id_is_its_own_error(tmp_path):
    import errno

    from wsi_embed.ids import MAX_ID_BYTES

    with pytest.raises(locks.LockNameTooLong) as info:
        try_lock(tmp_path, "x" * 300)
    err = info.value
    assert err.errno == errno.ENAMETOOLONG and isinstance(err, locks.LockError)
    assert str(err) == err.strerror and "300 bytes" in str(err) and f"max {MAX_ID_BYTES}" in str(err)
    assert "slide_id column" in str(err) and "free space" not in str(err)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_empty_lock(tmp_path, monkeypatch):
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.os, "write", full)
    with pytest.raises(OSError) as info:
        try_lock(tmp_path, "s")
    assert info.value.errno == errno.ENOSPC
    assert not lock_path(tmp_path, "s").exists()  # an empty one would block the slide for everyone
