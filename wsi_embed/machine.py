"""What machine a run or a benchmark ran on, for run records, reports and benchmark results."""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys

log = logging.getLogger(__name__)


def machine_info() -> dict:
    """This machine, cheaply: torch is asked about GPUs only when it is already imported."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        except Exception as exc:  # noqa: BLE001 - a description, never worth failing for
            log.debug("no GPU description: %r", exc)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"host": socket.gethostname(), "cpu": cpu, "cores": cores, "memory_gb": memory, "gpu": gpu,
            "platform": platform.platform(terse=True), "python": platform.python_version()}
