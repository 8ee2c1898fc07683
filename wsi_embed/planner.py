"""Where slides are planned (thumbnail, tissue, ink, annotations, grid): in the prep thread, or in
processes of their own.

Planning is CPU work in Python and numpy. In a thread it shares the GIL with the thread that feeds
the device; on a GPU host that thread must turn a batch around in milliseconds, and a cohort of
small biopsies needs several slides planned at once. Processes give both: no shared GIL, and one
slide planned per process in parallel. The first slide of a run is planned in the thread, so a
one-slide run starts no process.

Planning processes run niced, like the loader's workers: on a small CPU host they fill the gaps
instead of preempting one of the encoder's threads, whose partners then wait for it at every
parallel step (16 slides of 12k px on 2 cores: steady rate +6-9% in three alternating pairs).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from .jobs import EmbedOptions, SlideJob
from .plan import Cancelled, SlidePlan, plan_slide

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a prep thread waiting on a process looks for an interrupt
_PARENT_POLL_S = 1.0  # how often a planning process looks whether the run that started it is still there
BACKGROUND_NICE = 10  # helper processes (planning, loader workers) below the process feeding the encoder


def default_prepare_processes(device_type: str, cores: int | None = None) -> int:
    """One process on a CPU device or a small host (on 2 cores, 200 biopsies: 51 s in the thread, 39 s
    with a process); two on a GPU host with 8 cores or more (the loader workers take the other cores,
    niced below them)."""
    if cores is None:
        from .loader import cpu_cores

        cores = cpu_cores()
    return 2 if device_type != "cpu" and cores >= 8 else 1


def plan_slide_file(job: SlideJob, opts: EmbedOptions) -> SlidePlan:
    """:func:`~wsi_embed.plan.plan_slide` of a slide opened here: what a planning process runs."""
    from .slide import open_slide, resolve_mpp

    with open_slide(job.path, backend=opts.backend) as slide:
        return plan_slide(slide, resolve_mpp(slide, job.slide_mpp, warn=False), opts, job.slide_id, job=job)


def _init_planning_process(parent: int) -> None:
    """Ctrl-C reaches the whole process group: the run stops in the parent, which shuts the pool
    down; a planning process would only print a traceback of its own. It runs niced (see the module
    doc), and ends when the parent is gone: a parent killed with -9 never shuts the pool down, and
    the process holds its own pipe open, so it would wait for work for ever."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked from its start: see _submit
    try:
        os.nice(BACKGROUND_NICE)
    except OSError:  # a priority limit: plan at the parent's priority
        pass
    threading.Thread(target=_exit_with_parent, args=(parent,), name="wsi-embed-parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def _submit(pool: ProcessPoolExecutor, fn, *args):
    """``pool.submit`` with Ctrl-C blocked in this thread: a process the submit starts inherits the
    block, so a Ctrl-C while it imports (before its initializer ignores SIGINT) waits and is then
    ignored, instead of printing a traceback and breaking the pool. The run itself still gets it."""
    import signal

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class Planner:
    """Plans slides in the calling thread (``processes=0``) or in a pool of spawned processes."""

    def __init__(self, processes: int = 0):
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._planned = 0

    def _executor(self) -> ProcessPoolExecutor | None:
        with self._lock:
            if self._pool is None and self.processes > 0:
                import multiprocessing

                if multiprocessing.current_process().daemon:  # e.g. a dask worker: no children allowed
                    self.processes = 0
                    return None
                # spawn: the parent holds threads (zarr's I/O loop, torch) that fork would copy mid-state
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_planning_process, initargs=(os.getpid(),))
            return self._pool

    def plan(self, slide, mpp, job: SlideJob, opts: EmbedOptions, cancel: threading.Event) -> SlidePlan:
        with self._lock:
            first, self._planned = self._planned == 0, self._planned + 1
        # the first slide is planned here: a one-slide run never waits for (or pays) a process start
        pool = None if first else self._executor()
        if pool is None:
            return plan_slide(slide, mpp, opts, job.slide_id, cancel, job=job)
        try:
            future = _submit(pool, plan_slide_file, job, opts)
            while True:
                try:
                    return future.result(timeout=_POLL_S)
                except FutureTimeout:
                    if cancel.is_set():
                        future.cancel()  # a process already on it finishes that slide, unused
                        raise Cancelled from None
        except BrokenProcessPool:  # a planning process died (killed, out of memory): plan here instead
            log.warning("a slide-planning process died; planning in the prep thread from now on")
            with self._lock:
                self.processes, self._pool = 0, None
            return plan_slide(slide, mpp, opts, job.slide_id, cancel, job=job)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
