"""Cluster start-up for the dask driver: SLURM settings, the local/SLURM/scheduler clients, and the
checks that keep start-up from hanging. No torch, no dask at import (both are imported when a
cluster starts).

- ``"local"``: a LocalCluster on this machine: one worker per visible GPU, pinned with
  ``CUDA_VISIBLE_DEVICES`` (workers non-daemonic, so they may fork DataLoader workers), else
  single-threaded CPU workers sized to the cores.
- ``"slurm"``: dask-jobqueue's SLURMCluster (:class:`SlurmSettings`); refused at once without
  ``sbatch`` on PATH or without dask-jobqueue (:func:`check_cluster`).
- ``"tcp://..."``: a running scheduler; one that does not answer fails after ``connect_timeout``
  (20 s, ``WSI_EMBED_CONNECT_TIMEOUT``) with :class:`ClusterUnavailable`.
- :class:`NoWorkers`: a cluster without any worker for ``worker_timeout`` (600 s,
  ``WSI_EMBED_WORKER_TIMEOUT``) stops the run with one line.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

from ..errors import InvalidOption, RunWideError
from ..jobs import EmbedOptions

log = logging.getLogger(__name__)

# The workers' statistical profiler calls sys._current_frames() every 10 ms, which deadlocks
# CPython 3.11 now and then (python/cpython#106883, dask/distributed#8616): a worker hung forever
# reading a slide here. We need no profile, so the workers we start run without one.
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
DEFAULT_CONNECT_TIMEOUT = 20.0  # s to reach a scheduler given by address
DEFAULT_WORKER_TIMEOUT = 600.0  # s a cluster may have no worker at all (SLURM jobs pending) before we stop


class ClusterUnavailable(RunWideError, RuntimeError):
    """The dask cluster cannot be reached, or has had no worker for too long."""


def resolve_timeout(value: float | None, env: str, default: float) -> float:
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
        problem = _slurm_unreachable()
        if problem:
            raise InvalidOption(f"--cluster slurm: SLURM's controller does not answer here ({problem}); check that "
                                "`sinfo` works on this node, or use --cluster local")
    elif cluster != "local" and "://" not in cluster:
        raise InvalidOption(f"--cluster {cluster!r}: use local, slurm or a scheduler address (tcp://host:8786)")


@functools.lru_cache(maxsize=1)  # check_cluster runs from the CLI and from each driver
def _slurm_unreachable(timeout: float = 30.0) -> str | None:
    """Why ``sinfo`` cannot reach the controller, or None (also when there is no ``sinfo``): without
    this, dask-jobqueue's sbatch calls fail in tracebacks until the worker timeout runs out."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    try:
        proc = subprocess.run([sinfo, "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"sinfo gave no answer in {timeout:.0f} s"
    except OSError as exc:
        return f"sinfo cannot run: {exc.strerror or exc}"
    if proc.returncode != 0:
        first = next((ln.strip() for ln in proc.stderr.splitlines() if ln.strip()), f"exit status {proc.returncode}")
        return f"sinfo: {first[:200]}"
    return None


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
class ClusterPlan:
    """How the cluster :func:`open_client` started runs slides: a line for the log, the options each
    task gets (loader workers and device fitted to the workers) and torch threads per worker."""

    description: str
    options: EmbedOptions
    torch_threads: int | None = None


def _cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _visible_gpus(device: str) -> list[str]:
    """The GPUs a local cluster gets one worker each for (ids as ``CUDA_VISIBLE_DEVICES`` names them)."""
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
    connect_timeout = resolve_timeout(connect_timeout, "WSI_EMBED_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)
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
                plan = ClusterPlan(f"local cluster, {len(gpus)} GPU workers ({', '.join(gpus)})",
                                    replace(options, workers=loader, device=device))
            else:
                from distributed import LocalCluster

                n = n_workers or _cores()
                made = stack.enter_context(LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                    silence_logs=logging.ERROR))
                plan = ClusterPlan(f"local cluster, {n} CPU workers",
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
            plan = ClusterPlan(f"SLURM cluster, {jobs} job(s)", opts,
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
            plan = ClusterPlan(f"dask scheduler {cluster}", options)
        else:
            raise InvalidOption(f"--cluster {cluster!r}: use local, slurm or a scheduler address (tcp://host:8786)")
        yield client, plan


# -- waiting for workers -------------------------------------------------------------------------
class NoWorkers:
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


def no_worker_message(cluster: str, timeout: float, logs: Path) -> str:
    if cluster == "slurm":
        return (f"--cluster slurm: no dask worker joined for {timeout:g} s (jobs still pending? see "
                f"squeue --me, and the job logs in {logs}); completed slides are kept; set "
                "WSI_EMBED_WORKER_TIMEOUT=SECONDS to wait longer")
    return (f"--cluster {cluster}: the cluster had no dask worker for {timeout:g} s; start workers "
            f"(dask worker {cluster}), or set WSI_EMBED_WORKER_TIMEOUT=SECONDS to wait longer")
