"""The run manifest: one row per slide per run, appended to ``<out>/manifest.csv`` (or ``.jsonl``).

Several processes (SLURM array tasks, a second run on the same output) append to the same file.
Each row is one ``write`` to a file opened with ``O_APPEND``, under an exclusive ``flock``, so rows
never interleave; the CSV header is written by whoever finds the file empty, under the same lock.
The manifest is a log: a slide redone later gets a new row, and the last row per slide is its
current state (:func:`latest`).

:meth:`Manifest.check_writable` refuses a path that is, or may be, something else: a name with a
slide extension, or an existing non-empty file whose first line is not a manifest's (rows appended
to a slide would change its bytes). A row that cannot be appended (full disk) raises ``OSError``
with nothing half-written left behind; the drivers record that and go on (the store is complete).
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import stat
import time
from pathlib import Path

from ..atomic import append_whole
from ..errors import InvalidOption, OutputNotWritable
from ..jobs import SlideResult
from .discover import SLIDE_EXTENSIONS

FIELDS = ("timestamp", "host", "pid", "path", "slide_id", "status", "error", "note", "cells", "seconds",
          "encoders", "store")
_KEY_FIELDS = frozenset({"timestamp", "path", "slide_id", "status"})  # what any version's rows hold
_FIRST_LINE_MAX = 1 << 16


def manifest_row(result: SlideResult) -> dict:
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "path": result.path,
        "slide_id": result.slide_id,
        "status": result.status,
        "error": result.error or "",
        "note": result.note or "",
        "cells": result.cells,
        "seconds": round(result.seconds, 3),
        "encoders": ";".join(result.encoders),
        "store": result.store or "",
    }


class Manifest:
    """Appends rows to ``path`` safely from many processes. ``.jsonl`` gives JSON lines, else CSV."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.jsonl = self.path.suffix.lower() in (".jsonl", ".ndjson")

    def check_path(self) -> None:
        """Refuse, without touching anything, a slide's name or an existing file that is not a
        manifest of this format."""
        suffix = self.path.suffix.lower().lstrip(".")
        if suffix in SLIDE_EXTENSIONS:
            raise InvalidOption(f"--manifest {self.path}: has a slide file extension (.{suffix}); the manifest "
                                "is a .csv or .jsonl log, choose another path")
        self._check_existing()

    def check_writable(self) -> None:
        """Fail before any slide is embedded, not after the first one: :meth:`check_path`, and a
        path that cannot be written."""
        self.check_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                # O_NONBLOCK: a FIFO without a reader fails at once instead of hanging the run
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
            else:  # probe beside it, so a run that stops early leaves no empty manifest behind
                probe = self.path.with_name(f".{self.path.name}.probe-{os.getpid()}")
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                probe.unlink()
        except OSError as exc:
            raise OutputNotWritable(f"{self.path}: the manifest cannot be written ({exc.strerror or exc}); "
                                    "choose another --manifest") from exc

    def _check_existing(self) -> None:
        """Refuse an existing, non-empty regular file that is not a manifest of this format."""
        try:
            st = os.stat(self.path)
        except OSError:
            return  # missing (created later) or unreachable (the write probe says why)
        if stat.S_ISDIR(st.st_mode):
            raise OutputNotWritable(f"--manifest {self.path}: is a directory; give a file name "
                                    "(e.g. manifest.csv)")
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return  # /dev/null, or a manifest not written yet
        try:
            with open(self.path, "rb") as f:
                first = f.readline(_FIRST_LINE_MAX)
        except OSError as exc:
            raise OutputNotWritable(f"--manifest {self.path}: cannot be read ({exc.strerror or exc}); "
                                    "choose another --manifest") from exc
        if not _is_manifest_line(first, self.jsonl):
            kind = "a manifest row in JSON" if self.jsonl else "the manifest's CSV header"
            raise InvalidOption(f"--manifest {self.path}: exists and is not a wsi-embed manifest (its first "
                                f"line is not {kind}); choose another path, or remove the file")

    def append(self, result: SlideResult, **extra) -> dict:
        row = {**manifest_row(result), **extra}
        self.append_row(row)
        return row

    def append_row(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_whole(self.path, lambda size: self._encode(row, header=not self.jsonl and size == 0))

    def _encode(self, row: dict, header: bool) -> bytes:
        if self.jsonl:
            return (json.dumps(row) + "\n").encode()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerow(row)
        return buf.getvalue().encode()


def _is_manifest_line(line: bytes, jsonl: bool) -> bool:
    """Whether ``line``, a file's first line, starts a manifest (CSV header, or a JSON row)."""
    try:
        text = line.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return False
    if jsonl:
        try:
            row = json.loads(text)
        except ValueError:
            return False
        return isinstance(row, dict) and _KEY_FIELDS <= row.keys()
    header = next(csv.reader([text]), [])
    return _KEY_FIELDS <= {h.strip() for h in header}


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """All rows, oldest first ([] when there is no manifest)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(csv.DictReader(io.StringIO(text)))


def latest(rows: list[dict]) -> dict[str, dict]:
    """The last row per slide id, ignoring ``skipped`` rows that only say someone else had it."""
    out: dict[str, dict] = {}
    for row in rows:
        if row["status"] == "skipped" and row.get("note", "").startswith("locked"):
            continue
        out[row["slide_id"]] = row
    return out
