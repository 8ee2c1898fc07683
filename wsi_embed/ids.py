"""Rules for slide ids: what a store, a lock and their temporaries may be named.

An id names ``<out>/<id>.zarr``, the lock ``<out>/.<id>.lock`` and temporaries such as
``.<id>.zarr.tmp-<host>-<pid>-<hex>``, ``.<id>.zarr.old.tmp-<host>-<pid>-<hex>`` (the old store
during ``--overwrite``) and ``.<id>.zarr.bad.tmp-...`` (a repair's backup, as long). Two rules follow:

- an id must not contain ``.tmp-``: the cleanup of slide ``a`` removes ``.a.zarr.tmp-*``, which
  would match the temporaries of a slide named ``a.zarr.tmp-x``. Ids taken from file names have
  ``.tmp-`` changed to ``_tmp-`` (:func:`clean_natural_id`); ids given in a list are refused.
- the longest of those names must fit in one file name (255 bytes on the usual file systems).
  The limit does not depend on this host's name (any host may run any slide): hosts are
  counted at their longest (64 bytes, Linux ``HOST_NAME_MAX``) and pids at 7 digits. An id
  over the limit fails its slide alone (:func:`id_problem`), not the cohort.
"""

from __future__ import annotations

import os
import re

NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, NFS, Lustre, GPFS)
HOST_NAME_MAX = 64
PID_DIGITS = 7  # Linux pid_max is at most 4194304
TMP_MARK = ".tmp-"  # wsi_embed.store.TMP_MARK
# ".<id>.zarr.old.tmp-<host>-<pid>-<6 hex>" is the longest name made from an id.
_OVERHEAD = len(".") + len(".zarr.old") + len(TMP_MARK) + HOST_NAME_MAX + 1 + PID_DIGITS + 1 + 6
MAX_ID_BYTES = NAME_MAX - _OVERHEAD  # 161

_TMP_RE = re.compile(re.escape(TMP_MARK), re.IGNORECASE)


def id_bytes(slide_id: str) -> int:
    return len(os.fsencode(slide_id))


def id_problem(slide_id: str, path: str | os.PathLike | None = None) -> str | None:
    """Why ``slide_id`` cannot name this slide's files (one line naming ``path``), or None.

    Only the length is checked here (``/``, a leading ``.`` and ``.tmp-`` are refused or changed
    when ids are assigned); a too-long id fails its slide alone.
    """
    n = id_bytes(slide_id)
    if n > MAX_ID_BYTES:
        where = path if path is not None else f"slide {slide_id[:40]}..."
        return (f"{where}: slide id is {n} bytes, too long for a file name (max {MAX_ID_BYTES}); "
                "give it a shorter id with --list and a slide_id column")
    return None


def has_tmp_mark(slide_id: str) -> bool:
    return _TMP_RE.search(slide_id) is not None


def clean_natural_id(slide_id: str) -> str:
    """An id made from a file name, with ``.tmp-`` (any case) changed to ``_tmp-``."""
    return _TMP_RE.sub(lambda m: "_" + m.group(0)[1:], slide_id)
