"""What every cohort driver shares: the summary, the skip check and the recording of results.

- :class:`CohortSummary`: counts, the summary line and the exit status.
- :class:`Recorder`: a result becomes a manifest row, a count and a callback; a row the manifest
  cannot take (a full disk) is logged and counted, never a traceback.
- :func:`start_run`: the output folder and the manifest are checked before any slide is touched.
- :func:`id_failure` and :func:`settled`: the checks a driver makes before it spends anything on a
  slide (an id too long for a file name fails alone; a complete store is skipped).

No torch, no dask, no pipeline here: the drivers import the pipeline when they run slides.

Exit statuses (:attr:`CohortSummary.exit_code`): 0 every slide done or complete; 1 a slide failed,
or the manifest misses rows; 4 nothing failed but some slides were skipped because other live
runs held them (rerun once those finish to be sure they are done).
"""

from __future__ import annotations

import errno as errno_
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..ids import id_problem
from ..jobs import EmbedOptions, SlideJob, SlideResult
from ..resume import plan_resume
from ..store import ensure_writable, store_path
from .manifest import Manifest

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
EXIT_OK = 0
EXIT_FAILED = 1  # a slide failed, or manifest rows were lost
EXIT_LOCKED = 4  # nothing failed, but some slides were locked by other runs


@dataclass
class CohortSummary:
    total: int = 0  # slides this run was given (after sharding)
    done: int = 0
    skipped: int = 0
    failed: int = 0
    cells: int = 0
    seconds: float = 0.0  # wall time
    manifest: Path | None = None
    results: list[SlideResult] = field(default_factory=list)
    locked: int = 0  # skips because another live run held the slide (counted in ``skipped`` too)
    manifest_errors: int = 0  # rows the manifest could not take (full disk, ...): it is incomplete
    manifest_error: str | None = None  # the first such problem, one line

    def add(self, result: SlideResult) -> None:
        self.results.append(result)
        if result.status == "done":
            self.done += 1
            self.cells += result.cells
        elif result.status == "skipped":
            self.skipped += 1
            if (result.note or "").startswith("locked"):
                self.locked += 1
        else:
            self.failed += 1

    @property
    def ok(self) -> bool:
        """No slide failed and the manifest holds every row (locked slides do not count here)."""
        return self.failed == 0 and self.manifest_errors == 0

    @property
    def exit_code(self) -> int:
        """0 ok; 1 a slide failed or manifest rows were lost; 4 no failure, but slides were locked."""
        if not self.ok:
            return EXIT_FAILED
        return EXIT_LOCKED if self.locked else EXIT_OK

    def line(self) -> str:
        rate = f", {self.cells / self.seconds:.1f} patches/s" if self.cells and self.seconds else ""
        locked = f" ({self.locked} locked by other runs)" if self.locked else ""
        text = (f"{self.total} slides: {self.done} done, {self.skipped} skipped{locked}, {self.failed} failed "
                f"in {self.seconds:.1f} s{rate}")
        if self.manifest_errors:
            text += (f"; manifest incomplete: {self.manifest_errors} row(s) not written "
                     f"({self.manifest_error})")
        return text


class Recorder:
    """Where each driver sends a slide's result: a manifest row, the summary, the caller's callback.

    A row the manifest cannot take (``OSError``: full disk, quota, a vanished mount) loses that row
    only: the store is complete. The first such problem is logged as an error naming the manifest
    and the errno, later ones at debug level; :attr:`CohortSummary.manifest_errors` counts them.
    """

    def __init__(self, book: Manifest, summary: CohortSummary,
                 on_result: Callable[[SlideResult], None] | None = None):
        self.book, self.summary, self.on_result = book, summary, on_result

    def __call__(self, result: SlideResult, **extra) -> None:
        try:
            self.book.append(result, **extra)
        except OSError as exc:
            self._lost(result, exc)
        self.summary.add(result)
        if self.on_result is not None:
            self.on_result(result)

    def _lost(self, result: SlideResult, exc: OSError) -> None:
        code = errno_.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
        problem = f"{self.book.path}: cannot append to the manifest ({code}: {exc.strerror or exc})"
        summary = self.summary
        summary.manifest_errors += 1
        if summary.manifest_error is None:
            summary.manifest_error = problem
            log.error("%s; the row for %s (%s) is lost, its store is not affected; the manifest will be "
                      "incomplete", problem, result.slide_id, result.status)
        else:
            log.debug("%s; the row for %s is lost", problem, result.slide_id)


def default_manifest(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / MANIFEST_NAME


def start_run(jobs: Sequence[SlideJob], out_dir: str | os.PathLike, manifest: str | os.PathLike | None = None,
              on_result: Callable[[SlideResult], None] | None = None) -> tuple[Path, CohortSummary, Recorder]:
    """Before any slide: the output folder is made and written to (absolute, so manifest rows name
    stores that can be found from anywhere), the manifest is checked; returns ``(out_dir, summary,
    record)``."""
    out_dir = ensure_writable(Path(out_dir).absolute())
    book = Manifest(manifest or default_manifest(out_dir))
    book.check_writable()
    summary = CohortSummary(total=len(jobs), manifest=book.path)
    return out_dir, summary, Recorder(book, summary, on_result)


def failed_result(job: SlideJob, error: str) -> SlideResult:
    return SlideResult(str(job.path), job.slide_id, "failed", error=error)


def id_failure(job: SlideJob) -> SlideResult | None:
    """A ``failed`` result for a slide whose id cannot name a store (too long for a file name, ...),
    before any path is built from it (ENAMETOOLONG); else None."""
    problem = id_problem(job.slide_id, job.path)
    return None if problem is None else failed_result(job, problem)


def settled(job: SlideJob, out_dir: Path, names: Sequence[str], weights: str,
            options: EmbedOptions) -> SlideResult | None:
    """The pipeline's own resume check, made by a driver before it sends a slide anywhere: a result
    for a slide that needs no work (complete store: ``skipped``; a store of another file, an id too
    long for a file name: ``failed``), else None. ``names`` are the encoders' registry names."""
    failure = id_failure(job)
    if failure is not None:
        return failure
    resume = plan_resume(out_dir, job, names, weights, overwrite=options.overwrite, verify=options.verify,
                         options=options)
    if resume.error is not None:
        return failed_result(job, resume.error)
    if resume.nothing_to_do:
        return SlideResult(str(job.path), job.slide_id, "skipped", encoders=list(names),
                           store=str(store_path(out_dir, job.slide_id)), note=resume.skip_note, cells=resume.cells)
    return None
