"""Helpers for tests that need a real (single-node) SLURM cluster.

The cluster is managed by ``.ci/slurm.sh`` (munge + slurmctld + slurmd, state in
``$WSI_EMBED_SLURM_DIR``, default ``/tmp/wsi-embed-slurm``). Clients only need
``SLURM_CONF`` pointing at the generated config, which ``ensure_slurm()``
returns and also sets in ``os.environ`` so child processes (dask-jobqueue's
``sbatch``/``scancel`` calls) see it.

Typical use in a test::

    env = ensure_slurm()            # or pytest.skip if not slurm_available()
    job = sbatch("--wrap", "true", env=env)
    assert wait_for_jobs([job], timeout=60)[job] == "COMPLETED"
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_SH = REPO_ROOT / ".ci" / "slurm.sh"
DEFAULT_STATE_DIR = "/tmp/wsi-embed-slurm"

# job states after which a job will not run any more
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


def slurm_conf_path() -> Path:
    return Path(os.environ.get("WSI_EMBED_SLURM_DIR", DEFAULT_STATE_DIR)) / "slurm.conf"


def slurm_env() -> dict[str, str]:
    """Environment variables clients need to talk to the test cluster."""
    return {"SLURM_CONF": str(slurm_conf_path())}


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    merged.update(slurm_env())
    if env:
        merged.update(env)
    return merged


def slurm_available() -> bool:
    """True if a cluster can be used: already up, or can be brought up here."""
    if _is_up():
        return True
    tools = ("slurmctld", "slurmd", "sbatch", "munged")
    have_tools = all(shutil.which(t) or Path("/usr/sbin", t).exists() for t in tools)
    can_install = shutil.which("apt-get") is not None
    return os.geteuid() == 0 and SLURM_SH.exists() and (have_tools or can_install)


def _is_up() -> bool:
    if not SLURM_SH.exists():
        return False
    proc = subprocess.run(
        ["bash", str(SLURM_SH), "status"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    return proc.returncode == 0


def ensure_slurm(timeout: float = 900) -> dict[str, str]:
    """Bring the cluster up if needed; return (and export) the client env vars.

    The timeout covers a first-time ``apt-get install``; when the packages are
    present ``up`` takes about a second.
    """
    if not _is_up():
        proc = subprocess.run(
            ["bash", str(SLURM_SH), "up"],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f".ci/slurm.sh up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
    env = slurm_env()
    os.environ.update(env)
    return env


def sbatch(script_or_arg: str | os.PathLike[str], *args: str, env: Mapping[str, str] | None = None) -> str:
    """Submit with ``sbatch --parsable`` and return the job id (``"12"``).

    ``script_or_arg`` is a batch script path, or the first sbatch option, e.g.
    ``sbatch("--wrap", "echo hi", "--output", "/tmp/o")`` or
    ``sbatch(path, "--array=0-2")`` (options go before the script).
    """
    first = os.fspath(script_or_arg)
    if first.startswith("-"):
        argv = ["sbatch", "--parsable", first, *args]
    else:
        argv = ["sbatch", "--parsable", *args, first]
    proc = subprocess.run(
        argv, capture_output=True, text=True, check=False, env=_merged_env(env), timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    # --parsable prints "jobid" or "jobid;cluster"
    return proc.stdout.strip().splitlines()[-1].split(";")[0]


def _squeue_ids(job_ids: Iterable[str], env: Mapping[str, str]) -> set[str]:
    """Those of ``job_ids`` that squeue still lists (pending, running or completing).

    An id matches a job's own id, its array job id, or ``<array id>_<task>``.
    Lists all jobs rather than using ``-j``: squeue fails outright when any
    id given to ``-j`` has already been purged.
    """
    wanted = set(job_ids)
    proc = subprocess.run(
        ["squeue", "-h", "-o", "%i %A %F"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(env),
        timeout=30,
    )
    present: set[str] = set()
    for line in proc.stdout.splitlines():
        present.update(wanted.intersection(line.split()))
    return present


def job_states(job_id: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{job or array task id: state}`` from ``scontrol show job`` (e.g. ``{"7_0": "COMPLETED"}``).

    Finished jobs stay visible for ``MinJobAge`` (300 s in .ci/slurm.sh); after
    that the result is empty.
    """
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        check=False,
        env=_merged_env(env),
        timeout=30,
    )
    states: dict[str, str] = {}
    if proc.returncode != 0:
        return states
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" not in fields:
            continue
        task = fields.get("ArrayTaskId", "N/A")
        key = f"{fields['ArrayJobId']}_{task}" if task not in ("", "N/A") else fields["JobId"]
        states[key] = fields.get("JobState", "UNKNOWN")
    return states


def wait_for_jobs(
    job_ids: Iterable[str],
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    poll: float = 0.5,
) -> dict[str, str]:
    """Wait until none of ``job_ids`` is queued or running; return final states.

    Keys are plain job ids, or ``"<array id>_<task>"`` for array tasks. A job
    already purged from slurmctld (older than MinJobAge) maps to ``"UNKNOWN"``.
    Raises ``TimeoutError`` if jobs are still pending/running after ``timeout``.
    """
    ids = [str(j) for j in job_ids]
    full_env = _merged_env(env)
    deadline = time.monotonic() + timeout
    while True:
        if not _squeue_ids(ids, full_env):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM jobs {ids} not finished after {timeout} s")
        time.sleep(poll)
    result: dict[str, str] = {}
    for job in ids:
        result.update(job_states(job, full_env) or {job: "UNKNOWN"})
    return result
