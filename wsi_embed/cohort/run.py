"""The serial cohort driver: discover -> ids -> shard -> ``embed_slides`` -> manifest rows -> summary.

One process, one loader, one set of encoders for all of its slides. Resume and concurrency come
from ``embed_slides`` itself (complete stores are skipped without loading a model; slides are
locked while embedded), so the same command can be rerun, or run twice at once, safely.

What every driver shares lives here: :class:`CohortSummary` (counts, the summary line, the exit
status) and :class:`Recorder` (a result becomes a manifest row, a count and a callback; a row the
manifest cannot take, e.g. on a full disk, is logged and counted, never a traceback).

Exit statuses (:attr:`CohortSummary.exit_code`): 0 every slide done or complete; 1 a slide failed,
or the manifest misses rows; 4 nothing failed but some slides were skipped because other live
runs held them (rerun once those finish to be sure they are done).
"""

from __future__ import annotations

import contextlib
import errno as errno_
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..ids import id_problem
from ..jobs import EmbedOptions, SlideJob, SlideResult
from ..pipeline import embed_slides
from ..store import ensure_writable
from .discover import build_jobs
from .manifest import Manifest
from .shard import Shard

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


def plan_cohort(inputs: Sequence[str | os.PathLike] = (), list_file: str | os.PathLike | None = None, *,
                slide_mpp: float | None = None, shard: Shard | None = None,
                out_dir: str | os.PathLike | None = None) -> list[SlideJob]:
    """The jobs of this run: ids are given over the whole cohort first, then the shard is taken.

    ``out_dir``: the run's output folder; slides whose stores are there keep their ids (a cohort
    that grows re-embeds nothing, see :func:`~wsi_embed.cohort.discover.assign_ids`)."""
    jobs = build_jobs(inputs, list_file, slide_mpp, out_dir=out_dir)
    if shard is not None:
        jobs = shard.select(jobs)
        log.info("shard %s: %d slides", shard, len(jobs))
    return jobs


def default_manifest(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / MANIFEST_NAME


def run_cohort(jobs: Sequence[SlideJob], out_dir: str | os.PathLike, models: Sequence = ("lunit-bt-rn50",),
               weights: str = "auto", options: EmbedOptions = EmbedOptions(), *,
               manifest: str | os.PathLike | None = None,
               on_result: Callable[[SlideResult], None] | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> CohortSummary:
    """Embed ``jobs`` in this process; append one manifest row per slide as it finishes.

    Failed slides are counted and recorded; run-wide problems (weights, device, output
    directory) raise, as in :func:`~wsi_embed.pipeline.embed_slides`. A slide whose id is too
    long for a file name fails alone, before anything is built from its id.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()  # manifest rows name stores that can be found from anywhere
    ensure_writable(out_dir)
    book = Manifest(manifest or default_manifest(out_dir))
    book.check_writable()
    summary = CohortSummary(total=len(jobs), manifest=book.path)
    record = Recorder(book, summary, on_result)
    runnable = []
    for job in jobs:
        problem = id_problem(job.slide_id, job.path)
        if problem is None:
            runnable.append(job)
        else:
            record(SlideResult(str(job.path), job.slide_id, "failed", error=problem))
    try:
        # closing(): whatever stops the loop, the slide being prepared is cleaned up and unlocked
        with contextlib.closing(embed_slides(runnable, out_dir, models, weights, options,
                                             progress=progress)) as results:
            for result in results:
                record(result)
    finally:
        summary.seconds = time.perf_counter() - started
    return summary


def embed_cohort(jobs: Sequence[SlideJob], out_dir: str | os.PathLike, models: Sequence = ("lunit-bt-rn50",),
                 weights: str = "auto", options: EmbedOptions = EmbedOptions(), *,
                 cluster: str | None = None, slurm=None, n_workers: int | None = None,
                 manifest: str | os.PathLike | None = None,
                 on_result: Callable[[SlideResult], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> CohortSummary:
    """Serial in this process (``cluster=None``), or with dask (see :mod:`.dask_driver`)."""
    if cluster is None:
        return run_cohort(jobs, out_dir, models, weights, options, manifest=manifest, on_result=on_result,
                          progress=progress)
    from .dask_driver import run_cohort_dask

    return run_cohort_dask(jobs, out_dir, models, weights, options, cluster=cluster, slurm=slurm,
                           n_workers=n_workers, manifest=manifest, on_result=on_result)
