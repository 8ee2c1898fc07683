"""The dask driver: one task per slide, each calling :func:`wsi_embed.pipeline.embed_slide`.

Clusters: ``"local"`` (a LocalCluster on this machine: one worker per visible GPU, pinned with
``CUDA_VISIBLE_DEVICES``, or CPU workers sized to the cores), ``"tcp://..."`` (a running
scheduler) or ``"slurm"`` (dask-jobqueue's SLURMCluster, see :class:`SlurmSettings`). Starting
them is :mod:`.cluster`'s job (its names are re-exported here); this module submits the slides.

- Each worker process loads the encoders once and keeps them (:func:`_encoders`).
- Tasks that raise (transient trouble: a network file system, a busy GPU) are retried
  (``retries``); a slide whose input is bad comes back ``failed`` and is not retried.
- A slide that kills its worker (segfault, out of memory) is tried on at most
  ``allowed_failures + 1`` workers, then recorded ``failed`` (dask's ``KilledWorker``).
- The client keeps as many slides in flight as the cluster has threads and writes the manifest as
  they complete, with the worker's host and pid; complete stores are skipped by the client
  without submitting anything (and without starting a cluster when nothing is left).
- Dask worker processes are daemonic and may not fork DataLoader workers: the driver turns
  ``distributed.worker.daemon`` off where it starts the workers (local GPU, SLURM), and a task
  running in a daemonic process reads its slide in-process (``workers=0``).
- Nothing waits forever: ``--cluster slurm`` without ``sbatch`` (or dask-jobqueue) is refused at
  once; a scheduler address that does not answer fails after ``connect_timeout`` (20 s,
  ``WSI_EMBED_CONNECT_TIMEOUT``); a cluster without any worker for ``worker_timeout`` (600 s,
  ``WSI_EMBED_WORKER_TIMEOUT``; SLURM jobs that stay pending, a scheduler without workers) stops
  the run with one line (:class:`ClusterUnavailable`).
- The summary, the manifest and the skip check are the serial driver's, from :mod:`.results`:
  :func:`~.results.start_run` (output folder and manifest checked first), :class:`~.results.Recorder`
  and :func:`~.results.settled` (:func:`~wsi_embed.resume.plan_resume` on the client).
- Importing this module imports neither torch nor dask: the pipeline is imported on the worker
  when a slide runs, dask when a cluster starts.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from ..errors import RunWideError, WsiEmbedError
from ..jobs import EmbedOptions, SlideJob, SlideResult, model_name
from ..resume import plan_resume
# cluster start-up lives in .cluster; its names stay importable from here (see __all__)
from .cluster import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_WORKER_TIMEOUT, WORKER_CONFIG, ClusterPlan,
                      ClusterUnavailable, NoWorkers, SlurmSettings, _cores, _visible_gpus, check_cluster,
                      no_worker_message, open_client, resolve_timeout)
from .results import CohortSummary, failed_result, settled, start_run

__all__ = [
    "DEFAULT_ALLOWED_FAILURES", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_RETRIES", "DEFAULT_WORKER_TIMEOUT",
    "WORKER_CONFIG", "ClusterPlan", "ClusterUnavailable", "NoWorkers", "SlurmSettings", "_cores",
    "_visible_gpus", "check_cluster", "embed_task", "no_worker_message", "open_client", "resolve_timeout",
    "run_cohort_dask",
]

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 2
DEFAULT_ALLOWED_FAILURES = 1  # a slide may take down one worker (bad luck); the second time it is the slide


# -- worker side -------------------------------------------------------------------------------
_ENCODERS: dict[tuple, list] = {}
_ENCODERS_LOCK = threading.Lock()
_THREADS_SET: list[int] = []


def _encoders(models: Sequence[str], weights: str, device: str) -> list:
    """This process's encoders, loaded once per (models, weights, device)."""
    key = (tuple(models), weights, device)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            from ..encoders import load_encoder

            _ENCODERS[key] = [load_encoder(m, weights) for m in models]
        return _ENCODERS[key]


def embed_task(job: SlideJob, out_dir: str, models: Sequence[str], weights: str, options: EmbedOptions,
               torch_threads: int | None = None) -> tuple[SlideResult, str, int]:
    """One slide on a dask worker. Returns (result, host, pid) for the manifest."""
    from ..pipeline import embed_slide  # here, on the worker: importing this module stays torch-free

    if torch_threads and _THREADS_SET != [torch_threads]:
        import torch

        torch.set_num_threads(torch_threads)
        _THREADS_SET[:] = [torch_threads]
    if multiprocessing.current_process().daemon and options.workers != 0:
        options = replace(options, workers=0)  # daemonic processes cannot have DataLoader workers
    names = [model_name(m) for m in models]
    # Only to choose between the cached encoders and names (loaded by embed_slide if needed): no --verify here.
    if plan_resume(Path(out_dir), job, names, weights, overwrite=options.overwrite).todo:
        chosen = _encoders(models, weights, options.device)
    else:
        chosen = models  # nothing to do: embed_slide skips without loading anything
    result = embed_slide(job.path, out_dir, chosen, weights, options, slide_id=job.slide_id,
                         slide_mpp=job.slide_mpp)
    return result, socket.gethostname(), os.getpid()


# -- the driver --------------------------------------------------------------------------------
def run_cohort_dask(jobs: Sequence[SlideJob], out_dir: str | os.PathLike, models: Sequence[str] = ("lunit-bt-rn50",),
                    weights: str = "auto", options: EmbedOptions = EmbedOptions(), *,
                    cluster: str = "local", slurm: SlurmSettings | None = None, n_workers: int | None = None,
                    manifest: str | os.PathLike | None = None,
                    on_result: Callable[[SlideResult], None] | None = None,
                    retries: int = DEFAULT_RETRIES, allowed_failures: int = DEFAULT_ALLOWED_FAILURES,
                    task: Callable = embed_task, connect_timeout: float | None = None,
                    worker_timeout: float | None = None) -> CohortSummary:
    """Embed ``jobs`` on a dask cluster, one task per slide; the manifest is written here.

    ``models`` are registry names (each worker loads them once). Run-wide errors (weights,
    device, output directory, a cluster that cannot start) cancel the run and raise, as in the
    serial driver. ``connect_timeout``: seconds to reach a scheduler address (default
    ``WSI_EMBED_CONNECT_TIMEOUT`` or 20); ``worker_timeout``: seconds the cluster may have no
    worker at all before the run stops (default ``WSI_EMBED_WORKER_TIMEOUT`` or 600).
    """
    started = time.perf_counter()
    check_cluster(cluster)
    connect_timeout = resolve_timeout(connect_timeout, "WSI_EMBED_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)
    worker_timeout = resolve_timeout(worker_timeout, "WSI_EMBED_WORKER_TIMEOUT", DEFAULT_WORKER_TIMEOUT)
    out_dir, summary, record = start_run(jobs, out_dir, manifest, on_result)
    names = [model_name(m) for m in models]

    todo = []
    for job in jobs:  # complete stores: no task, no cluster if nothing is left
        settled_ = settled(job, out_dir, names, weights, options)
        if settled_ is None:
            todo.append(job)
        else:
            record(settled_)
    if not todo:
        summary.seconds = time.perf_counter() - started
        return summary

    import dask
    from distributed import wait
    from distributed.scheduler import KilledWorker

    # Read by the scheduler when it starts (local and SLURM clusters run it in this process).
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures, **WORKER_CONFIG}), \
            open_client(cluster, options, slurm=slurm, n_workers=n_workers,
                        log_directory=out_dir / "logs", connect_timeout=connect_timeout) as (client, plan):
        log.info("%s: %d slides to embed", plan.description, len(todo))
        queue = deque(todo)
        running: dict = {}

        watchdog = NoWorkers(worker_timeout, no_worker_message(cluster, worker_timeout, out_dir / "logs"))

        def refill() -> None:
            # As many slides in flight as the cluster has threads, so a slide that kills its worker
            # finds no other slide queued there (those would count a worker death too). Re-read
            # each time: SLURM workers arrive, and leave, as the run goes.
            threads = sum(client.nthreads().values())
            watchdog.check(threads)
            limit = max(1, threads)
            while queue and len(running) < limit:
                job = queue.popleft()
                fut = client.submit(task, job, str(out_dir), list(models), weights, plan.options,
                                    plan.torch_threads, key=f"wsi-embed-{uuid.uuid4().hex}", retries=retries,
                                    pure=False)
                running[fut] = job

        try:
            refill()
            while running:
                try:
                    done, _ = wait(list(running), timeout=2.0, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = ()
                for fut in done:
                    job = running.pop(fut)
                    try:
                        result, host, pid = fut.result()
                        record(result, host=host, pid=pid)
                    except KilledWorker as exc:
                        record(failed_result(job, "the dask worker died while embedding this slide (segfault or out "
                                            f"of memory?), {allowed_failures + 1} time(s); see the worker logs "
                                            f"({exc})"))
                    except RunWideError:
                        raise
                    except WsiEmbedError as exc:
                        record(failed_result(job, str(exc)))
                    except Exception as exc:  # after the retries: this slide failed, the others go on
                        record(failed_result(job, f"{job.path}: {type(exc).__name__}: {exc} (after {retries} retries)"))
                refill()
        finally:
            client.cancel(list(running))
    summary.seconds = time.perf_counter() - started
    return summary
