"""The serial cohort driver: discover -> ids -> shard -> ``embed_slides`` -> manifest rows -> summary.

One process, one loader, one set of encoders for all of its slides. Resume and concurrency come
from ``embed_slides`` itself (complete stores are skipped without loading a model; slides are
locked while embedded), so the same command can be rerun, or run twice at once, safely.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..jobs import EmbedOptions, SlideJob, SlideResult
from ..store import ensure_writable
from .discover import build_jobs
from .manifest import Manifest
from .shard import Shard

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"


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

    def add(self, result: SlideResult) -> None:
        self.results.append(result)
        if result.status == "done":
            self.done += 1
            self.cells += result.cells
        elif result.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def line(self) -> str:
        rate = f", {self.cells / self.seconds:.1f} patches/s" if self.cells and self.seconds else ""
        return (f"{self.total} slides: {self.done} done, {self.skipped} skipped, {self.failed} failed "
                f"in {self.seconds:.1f} s{rate}")


def plan_cohort(inputs: Sequence[str | os.PathLike] = (), list_file: str | os.PathLike | None = None, *,
                slide_mpp: float | None = None, shard: Shard | None = None) -> list[SlideJob]:
    """The jobs of this run: ids are given over the whole cohort first, then the shard is taken."""
    jobs = build_jobs(inputs, list_file, slide_mpp)
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
    directory) raise, as in :func:`~wsi_embed.pipeline.embed_slides`.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()  # manifest rows name stores that can be found from anywhere
    ensure_writable(out_dir)
    book = Manifest(manifest or default_manifest(out_dir))
    book.check_writable()
    summary = CohortSummary(total=len(jobs), manifest=book.path)
    try:
        # closing(): whatever stops the loop, the slide being prepared is cleaned up and unlocked
        with contextlib.closing(embed_slides(jobs, out_dir, models, weights, options, progress=progress)) as results:
            for result in results:
                book.append(result)
                summary.add(result)
                if on_result is not None:
                    on_result(result)
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
