"""The dask driver: one task per slide, each calling :func:`wsi_embed.pipeline.embed_slide`.

Clusters: ``"local"`` (a LocalCluster on this machine: one worker per visible GPU, pinned with
``CUDA_VISIBLE_DEVICES``, or CPU workers sized to the cores), ``"tcp://..."`` (a running
scheduler) or ``"slurm"`` (dask-jobqueue's SLURMCluster, see :class:`SlurmSettings`).

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
- The summary, the manifest and the skip check are the serial driver's: :class:`~.run.Recorder`,
  :meth:`~.manifest.Manifest.check_writable` first, and :func:`~wsi_embed.resume.plan_resume`.
"""

from __future__ import annotations

import json
import logging
import importlib.util
import multiprocessing
import os
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import InvalidOption, WsiEmbedError
from ..errors import RunWideError
from ..ids import id_problem
from ..jobs import EmbedOptions, SlideJob, SlideResult, model_name
from ..pipeline import embed_slide
from ..resume import plan_resume
from ..store import ensure_writable, store_path
from .manifest import Manifest
from .run import CohortSummary, Recorder, default_manifest

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 2
DEFAULT_ALLOWED_FAILURES = 1  # a slide may take down one worker (bad luck); the second time it is the slide
# The workers' statistical profiler calls sys._current_frames() every 10 ms, which deadlocks
# CPython 3.11 now and then (python/cpython#106883, dask/distributed#8616): a worker hung forever
# reading a slide here. We need no profile, so the workers we start run without one.
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
DEFAULT_CONNECT_TIMEOUT = 20.0  # s to reach a scheduler given by address
DEFAULT_WORKER_TIMEOUT = 600.0  # s a cluster may have no worker at all (SLURM jobs pending) before we stop


class ClusterUnavailable(RunWideError, RuntimeError):
    """The dask cluster cannot be reached, or has had no worker for too long."""


def _timeout(value: float | None, env: str, default: float) -> float:
    """``value``, else the environment variable ``env``, else ``default``: a positive number of seconds."""
    if value is None:
        text = os.environ.get(env, "").strip()
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            raise InvalidOption(f"{env}={text!r}: expected a number of seconds") from None
        where = env
    else:
        where = env.lower()
    if not value > 0:
        raise InvalidOption(f"{where} must be a positive number of seconds, got {value}")
    return float(value)


def check_cluster(cluster: str) -> None:
    """Refuse, in one line and at once, a ``--cluster`` that cannot start here."""
    if cluster == "slurm":
        if shutil.which("sbatch") is None:
            raise InvalidOption("--cluster slurm needs SLURM's sbatch on PATH; run on a SLURM login node "
                                "(e.g. after `module load slurm`), or use --cluster local")
        if importlib.util.find_spec("dask_jobqueue") is None:
            raise InvalidOption("--cluster slurm needs dask-jobqueue; install it (pip install dask-jobqueue)")
    elif cluster != "local" and "://" not in cluster:
        raise InvalidOption(f"--cluster {cluster!r}: use local, slurm or a scheduler address (tcp://host:8786)")


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


# -- clusters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmSettings:
    """SLURMCluster settings. Anything left None comes from dask's own jobqueue config
    (``~/.config/dask/jobqueue.yaml``, section ``jobqueue.slurm``) or its defaults."""

    queue: str | None = None
    walltime: str | None = None  # "HH:MM:SS"
    gres: str | None = None  # e.g. "gpu:1"
    cores: int | None = None  # CPUs per job (one dask worker per job, one slide at a time)
    memory: str | None = None  # per job, e.g. "16GB"
    jobs: int = 1
    extra: dict = field(default_factory=dict)  # any other SLURMCluster keyword (account, ...)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SlurmSettings":
        """A JSON or YAML mapping with the fields above; unknown keys go to ``extra``."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidOption(f"--cluster-config {path}: cannot read it ({exc.strerror or exc})") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # JSON and YAML parsers raise their own types
            raise InvalidOption(f"--cluster-config {path}: not valid JSON/YAML ({exc})") from None
        if not isinstance(data, dict):
            raise InvalidOption(f"--cluster-config {path}: expected a mapping of settings")
        data = data.get("slurm", data)  # allow {"slurm": {...}}
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {**data.get("extra", {}), **{k: v for k, v in data.items() if k not in known and k != "extra"}}
        return cls(**kwargs, extra=extra)

    def merged(self, **overrides) -> "SlurmSettings":
        """These settings with the non-None ``overrides`` (command-line options win over a file)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def cluster_kwargs(self, log_directory: Path | None = None) -> dict:
        kwargs = dict(self.extra)
        for name in ("queue", "walltime", "memory"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        # One dask thread per job (one slide at a time); the job's CPUs go to torch and the loader.
        kwargs.setdefault("cores", 1)
        kwargs.setdefault("processes", 1)
        if self.cores is not None:
            kwargs.setdefault("job_cpu", self.cores)
        if "memory" not in kwargs:
            kwargs["memory"] = "16GB"  # SLURMCluster insists on a value; generous for one slide
        directives = list(kwargs.pop("job_extra_directives", []))
        if self.gres:
            directives.append(f"--gres={self.gres}")
        if directives:
            kwargs["job_extra_directives"] = directives
        # Let the worker fork DataLoader workers (see module doc).
        prologue = list(kwargs.pop("job_script_prologue", []))
        kwargs["job_script_prologue"] = ["export DASK_DISTRIBUTED__WORKER__DAEMON=False",
                                         "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False", *prologue]
        if log_directory is not None:
            kwargs.setdefault("log_directory", str(log_directory))
        kwargs.setdefault("scheduler_options", {"dashboard_address": ":0"})
        return kwargs


@dataclass
class _ClusterPlan:
    description: str
    options: EmbedOptions
    torch_threads: int | None = None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _visible_gpus(device: str) -> list[str]:
    if device == "cpu":
        return []
    try:
        import torch

        count = torch.cuda.device_count()  # does not create a CUDA context in this process
    except Exception:  # no usable CUDA build: CPU workers
        return []
    if count == 0:
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


@contextmanager
def open_client(cluster: str, options: EmbedOptions, *, slurm: SlurmSettings | None = None,
                n_workers: int | None = None, log_directory: Path | None = None,
                connect_timeout: float | None = None) -> Iterator[tuple]:
    """Start (or connect to) the cluster; yields ``(client, plan)`` and shuts down what it started.

    ``connect_timeout`` (s; default ``WSI_EMBED_CONNECT_TIMEOUT`` or 20) bounds reaching a scheduler
    given by address."""
    check_cluster(cluster)
    connect_timeout = _timeout(connect_timeout, "WSI_EMBED_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)
    import dask
    from distributed import Client

    with ExitStack() as stack:
        if cluster == "local":
            gpus = _visible_gpus(options.device)
            if gpus:
                from distributed import Nanny, Scheduler, SpecCluster

                stack.enter_context(dask.config.set({"distributed.worker.daemon": False}))
                spec = {f"gpu-{g}": {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": g}}}
                        for g in gpus}
                made = stack.enter_context(SpecCluster(
                    workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
                    silence_logs=logging.ERROR))
                loader = options.workers if options.workers is not None else max(0, _cores() // len(gpus) - 1)
                device = "cuda" if options.device.startswith("cuda") else options.device
                plan = _ClusterPlan(f"local cluster, {len(gpus)} GPU workers ({', '.join(gpus)})",
                                    replace(options, workers=loader, device=device))
            else:
                from distributed import LocalCluster

                n = n_workers or _cores()
                made = stack.enter_context(LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                    silence_logs=logging.ERROR))
                plan = _ClusterPlan(f"local cluster, {n} CPU workers",
                                    replace(options, workers=0 if options.workers is None else options.workers),
                                    torch_threads=max(1, _cores() // n))
            client = stack.enter_context(Client(made))
        elif cluster == "slurm":
            from dask_jobqueue import SLURMCluster

            settings = slurm or SlurmSettings()
            made = stack.enter_context(SLURMCluster(**settings.cluster_kwargs(log_directory)))
            jobs = n_workers or settings.jobs
            made.scale(jobs=jobs)
            opts = options
            if options.workers is None and not settings.gres:
                opts = replace(options, workers=0)  # CPU jobs: the job's cores go to torch
            plan = _ClusterPlan(f"SLURM cluster, {jobs} job(s)", opts,
                                torch_threads=None if settings.gres else settings.cores)
            client = stack.enter_context(Client(made))
        elif "://" in cluster:
            try:
                client = stack.enter_context(Client(cluster, timeout=connect_timeout))
            except (OSError, TimeoutError) as exc:  # distributed says "Timed out trying to connect ..."
                log.debug("connecting to %s: %s", cluster, exc)
                raise ClusterUnavailable(
                    f"--cluster {cluster}: no dask scheduler answered within {connect_timeout:g} s; "
                    "check the address and that the scheduler is running") from None
            plan = _ClusterPlan(f"dask scheduler {cluster}", options)
        else:
            raise InvalidOption(f"--cluster {cluster!r}: use local, slurm or a scheduler address (tcp://host:8786)")
        yield client, plan


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
    connect_timeout = _timeout(connect_timeout, "WSI_EMBED_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)
    worker_timeout = _timeout(worker_timeout, "WSI_EMBED_WORKER_TIMEOUT", DEFAULT_WORKER_TIMEOUT)
    out_dir = ensure_writable(Path(out_dir).absolute())
    book = Manifest(manifest or default_manifest(out_dir))
    book.check_writable()
    summary = CohortSummary(total=len(jobs), manifest=book.path)
    record = Recorder(book, summary, on_result)
    names = [model_name(m) for m in models]

    todo = []
    for job in jobs:  # complete stores: no task, no cluster if nothing is left
        settled = _settled(job, out_dir, names, weights, options)
        if settled is None:
            todo.append(job)
        else:
            record(settled)
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

        watchdog = _NoWorkers(worker_timeout, _no_worker_message(cluster, worker_timeout, out_dir / "logs"))

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
                        record(_failed(job, "the dask worker died while embedding this slide (segfault or out "
                                            f"of memory?), {allowed_failures + 1} time(s); see the worker logs "
                                            f"({exc})"))
                    except RunWideError:
                        raise
                    except WsiEmbedError as exc:
                        record(_failed(job, str(exc)))
                    except Exception as exc:  # after the retries: this slide failed, the others go on
                        record(_failed(job, f"{job.path}: {type(exc).__name__}: {exc} (after {retries} retries)"))
                refill()
        finally:
            client.cancel(list(running))
    summary.seconds = time.perf_counter() - started
    return summary


def _failed(job: SlideJob, error: str) -> SlideResult:
    return SlideResult(str(job.path), job.slide_id, "failed", error=error)


def _settled(job: SlideJob, out_dir: Path, names: Sequence[str], weights: str,
             options: EmbedOptions) -> SlideResult | None:
    """The pipeline's own resume check, on the client: a result for a slide that needs no task
    (complete store: skipped; a store of another file, an id too long for a file name: failed), else None."""
    problem = id_problem(job.slide_id, job.path)
    if problem is not None:  # before any path is built from the id (ENAMETOOLONG)
        return _failed(job, problem)
    resume = plan_resume(out_dir, job, names, weights, overwrite=options.overwrite, verify=options.verify)
    if resume.error is not None:
        return _failed(job, resume.error)
    if resume.nothing_to_do:
        return SlideResult(str(job.path), job.slide_id, "skipped", encoders=list(names),
                           store=str(store_path(out_dir, job.slide_id)), note="complete")
    return None


class _NoWorkers:
    """Raises :class:`ClusterUnavailable` once the cluster has had no worker for ``timeout`` s."""

    def __init__(self, timeout: float, message: str):
        self.timeout, self.message, self.since = timeout, message, None

    def check(self, threads: int) -> None:
        now = time.monotonic()
        if threads > 0:
            self.since = None
        elif self.since is None:
            self.since = now
        elif now - self.since > self.timeout:
            raise ClusterUnavailable(self.message)


def _no_worker_message(cluster: str, timeout: float, logs: Path) -> str:
    if cluster == "slurm":
        return (f"--cluster slurm: no dask worker joined for {timeout:g} s (jobs still pending? see "
                f"squeue --me, and the job logs in {logs}); completed slides are kept; set "
                "WSI_EMBED_WORKER_TIMEOUT=SECONDS to wait longer")
    return (f"--cluster {cluster}: the cluster had no dask worker for {timeout:g} s; start workers "
            f"(dask worker {cluster}), or set WSI_EMBED_WORKER_TIMEOUT=SECONDS to wait longer")
