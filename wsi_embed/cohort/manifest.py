"""The run manifest: one row per slide per run, appended to ``<out>/manifest.csv`` (or ``.jsonl``).

Several processes (SLURM array tasks, a second run on the same output) append to the same file.
Each row is one ``write`` to a file opened with ``O_APPEND``, under an exclusive ``flock``, so rows
never interleave; the CSV header is written by whoever finds the file empty, under the same lock.
The manifest is a log: a slide redone later gets a new row, and the last row per slide is its
current state (:func:`latest`).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import socket
import time
from pathlib import Path

from ..errors import OutputNotWritable
from ..jobs import SlideResult

FIELDS = ("timestamp", "host", "pid", "path", "slide_id", "status", "error", "note", "cells", "seconds",
          "encoders", "store")


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

    def check_writable(self) -> None:
        """Fail before any slide is embedded, not after the first one."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND))
            else:  # probe beside it, so a run that stops early leaves no empty manifest behind
                probe = self.path.with_name(f".{self.path.name}.probe-{os.getpid()}")
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                probe.unlink()
        except OSError as exc:
            raise OutputNotWritable(f"{self.path}: the manifest cannot be written ({exc.strerror or exc}); "
                                    "choose another --manifest") from exc

    def append(self, result: SlideResult, **extra) -> dict:
        row = {**manifest_row(result), **extra}
        self.append_row(row)
        return row

    def append_row(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                header = not self.jsonl and os.fstat(fd).st_size == 0
                _write_all(fd, self._encode(row, header))
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _encode(self, row: dict, header: bool) -> bytes:
        if self.jsonl:
            return (json.dumps(row) + "\n").encode()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerow(row)
        return buf.getvalue().encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


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
