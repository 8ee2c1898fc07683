"""Job-array shards: a deterministic partition of the cohort, each slide in exactly one shard.

Slides are sorted by slide id and dealt round-robin (shard ``i`` of ``N`` takes sorted positions
``i, i + N, ...``), so shards are balanced to within one slide and do not depend on input order.
Every task must see the same cohort: do not add slides while an array runs (a rerun picks up
anything missed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

from ..errors import InvalidOption

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InvalidOption(f"--shard {self.index}/{self.count}: need 0 <= index < count")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, jobs: Sequence[T]) -> list[T]:
        """This shard's jobs (objects with a ``slide_id``), in sorted-id order."""
        ordered = sorted(jobs, key=lambda j: j.slide_id)
        return ordered[self.index :: self.count]


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidOption(f"--shard slurm: {name}={value!r} is not an integer") from None


def slurm_shard(env: Mapping[str, str] | None = None) -> Shard:
    """The shard of this SLURM array task.

    index = (TASK_ID - TASK_MIN) / STEP and count = TASK_COUNT (or (MAX - MIN) / STEP + 1), so
    ``--array=1-8`` and ``--array=0-14:2`` work as well as ``--array=0-7``.
    """
    env = os.environ if env is None else env
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        raise InvalidOption("--shard slurm: SLURM_ARRAY_TASK_ID is not set; this is not a SLURM array task "
                            "(submit with sbatch --array=0-N, or use --shard i/N)")
    lo = _env_int(env, "SLURM_ARRAY_TASK_MIN")
    hi = _env_int(env, "SLURM_ARRAY_TASK_MAX")
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    lo = 0 if lo is None else lo
    if count is None:
        if hi is None:
            raise InvalidOption("--shard slurm: neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX is set")
        count = (hi - lo) // step + 1
    offset = task - lo
    if offset < 0 or offset % step or offset // step >= count:
        raise InvalidOption(
            f"--shard slurm: task {task} does not fit array min {lo}, step {step}, count {count}; "
            "use a contiguous range such as --array=0-N (or --array=A-B:S)")
    return Shard(offset // step, count)


def parse_shard(spec: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """``None``/``""`` (everything), ``"i/N"`` or ``"slurm"``."""
    if spec is None or spec == "":
        return None
    if spec.strip().lower() == "slurm":
        return slurm_shard(env)
    index, sep, count = spec.partition("/")
    try:
        if not sep:
            raise ValueError
        return Shard(int(index), int(count))
    except ValueError:
        raise InvalidOption(f"--shard {spec!r}: use i/N (e.g. 0/4, with 0 <= i < N) or 'slurm'") from None
