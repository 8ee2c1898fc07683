"""The serial cohort driver: discover -> ids -> shard -> ``embed_slides`` -> manifest rows -> summary.

One process, one loader, one set of encoders for all of its slides. Resume and concurrency come
from ``embed_slides`` itself (complete stores are skipped without loading a model; slides are
locked while embedded), so the same command can be rerun, or run twice at once, safely.

What every driver shares (:class:`CohortSummary`, :class:`Recorder`, the exit statuses, the skip
check) lives in :mod:`.results` and is re-exported here. The pipeline (and with it torch) is
imported when slides are run, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Sequence

from ..jobs import EmbedOptions, SlideJob, SlideResult
from .discover import build_jobs
from .results import (EXIT_FAILED, EXIT_LOCKED, EXIT_OK, MANIFEST_NAME, CohortSummary, Recorder,
                      default_manifest, id_failure, start_run)
from .shard import Shard, parse_shard

__all__ = [  # the shared names from .results stay importable from here
    "EXIT_FAILED", "EXIT_LOCKED", "EXIT_OK", "MANIFEST_NAME", "CohortSummary", "Recorder", "default_manifest",
    "embed_cohort", "plan_cohort", "run_cohort",
]

log = logging.getLogger(__name__)


def plan_cohort(inputs: Sequence[str | os.PathLike] = (), list_file: str | os.PathLike | None = None, *,
                slide_mpp: float | None = None, shard: Shard | str | None = None,
                out_dir: str | os.PathLike | None = None, options: EmbedOptions | None = None) -> list[SlideJob]:
    """The jobs of this run: ids are given over the whole cohort first, then the shard is taken.

    ``out_dir``: the run's output folder; slides whose stores are there keep their ids (a cohort
    that grows re-embeds nothing, see :func:`~wsi_embed.cohort.discover.assign_ids`). ``shard``: a
    :class:`Shard` or its CLI spelling, ``"I/N"``."""
    if isinstance(shard, str):
        shard = parse_shard(shard)
    jobs = build_jobs(inputs, list_file, slide_mpp, out_dir=out_dir)
    if options is not None:  # on the whole cohort: a shard of one slide must not hide a shared mask file
        from ..masks import check_one_file_specs

        check_one_file_specs(jobs, options)
    if shard is not None:
        jobs = shard.select(jobs)
        log.info("shard %s: %d slides", shard, len(jobs))
    return jobs


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
    from ..pipeline import embed_slides  # here, not at import: importing the cohort stays torch-free

    started = time.perf_counter()
    out_dir, summary, record = start_run(jobs, out_dir, manifest, on_result)
    runnable = []
    for job in jobs:
        failure = id_failure(job)
        if failure is None:
            runnable.append(job)
        else:
            record(failure)
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
    from ..masks import check_one_file_specs

    check_one_file_specs(jobs, options)  # before anything is written
    if cluster is None:
        return run_cohort(jobs, out_dir, models, weights, options, manifest=manifest, on_result=on_result,
                          progress=progress)
    from .dask_driver import run_cohort_dask

    return run_cohort_dask(jobs, out_dir, models, weights, options, cluster=cluster, slurm=slurm,
                           n_workers=n_workers, manifest=manifest, on_result=on_result)
