"""Patch buffers shared once between loader workers and the main process, then reused.

Handing each region's patches over in a fresh shared-memory tensor costs, per region, a new shm
file, zeroed pages faulted in by the worker, a file descriptor passed over a socket and a new
mapping in the main process: a quarter of a worker's time on 224 px reads. A :class:`SlotPool` is
one shared buffer made before the workers start, cut into fixed slots. A worker takes a free slot,
decodes into it and sends only the slot's number; the main process views the same memory, and the
slot goes back to the free list when the last tensor viewing it is gone (pinned, copied to the
device, or consumed by a CPU encoder), so nothing has to remember to return it.

A worker that finds no free slot, or a region larger than a slot, falls back to a fresh shared
tensor: the pool makes the common case cheap and never blocks a worker.
"""

from __future__ import annotations

import itertools
import math
import mmap
import multiprocessing
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch

_POOLS: "weakref.WeakValueDictionary[int, SlotPool]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


@dataclass(frozen=True)
class Slot:
    """What a worker sends for patches written into a pool: which pool, which slot, what shape."""

    pool: int
    index: int
    shape: tuple[int, ...]


class SlotPool:
    """``slots`` buffers of ``slot_bytes`` each, in one anonymous shared mapping.

    Made in the main process before the loader's workers are forked, which inherit the mapping
    (:func:`usable` says whether workers are forked). Pages are backed only once a slot is used, and
    the lowest free slot is taken first, so the pool costs memory in proportion to the regions in
    flight, not to its size."""

    def __init__(self, slots: int, slot_bytes: int, context=None):
        self.id = next(_IDS)
        self.slots, self.slot_bytes = slots, slot_bytes
        self._mapping = mmap.mmap(-1, slots * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS
        self._memory = torch.frombuffer(self._mapping, dtype=torch.uint8)
        ctx = context or multiprocessing.get_context()
        # 1 = taken; re-entrant, since a lease may be returned by the garbage collector at any point
        self._taken = ctx.Array("B", slots, lock=ctx.RLock())
        _POOLS[self.id] = self

    def __reduce__(self):
        raise TypeError("a SlotPool is shared with forked workers only")

    def take(self, shape: tuple[int, ...]) -> tuple[Slot, np.ndarray] | None:
        """A free slot as a writable uint8 array of ``shape`` (in a worker), or None: none free,
        or too small."""
        if math.prod(shape) > self.slot_bytes:
            return None
        with self._taken.get_lock():
            index = bytes(self._taken.get_obj()).find(0)  # the lowest free: few slots' pages are touched
            if index < 0:
                return None
            self._taken[index] = 1
        return Slot(self.id, index, tuple(shape)), self._view(index, shape).numpy()

    def put_back(self, slot: Slot) -> None:
        """A slot taken but not sent (the read failed)."""
        self._release(slot.index)

    def _release(self, index: int) -> None:
        with self._taken.get_lock():
            self._taken[index] = 0

    def free(self) -> int:
        """Slots free now."""
        with self._taken.get_lock():
            return self.slots - sum(self._taken.get_obj())

    def lease(self, slot: Slot) -> torch.Tensor:
        """The slot's patches as a tensor (in the main process); the slot is free again once every
        tensor viewing this memory is gone."""
        view = self._view(slot.index, slot.shape).numpy()
        lease = _Lease(view, self._release, slot.index)
        return torch.from_numpy(np.asarray(lease))

    def _view(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        start = index * self.slot_bytes
        return self._memory[start : start + math.prod(shape)].view(shape)


class _Lease:
    """Keeps a slot's memory alive while viewed; returns the slot when the last view goes."""

    def __init__(self, view: np.ndarray, release, index: int):
        self._view, self._release, self._index = view, release, index
        self.__array_interface__ = view.__array_interface__

    def __del__(self):
        try:
            self._release(self._index)
        except (ValueError, OSError, AttributeError):  # interpreter shutdown: nothing left to return to
            pass


def usable(context=None) -> bool:
    """Whether loader workers started from ``context`` inherit a pool: they must be forked."""
    return (context or multiprocessing.get_context()).get_start_method() == "fork"


def pool_for(slot: Slot) -> SlotPool:
    pool = _POOLS.get(slot.pool)
    if pool is None:
        raise RuntimeError(f"slot pool {slot.pool} is gone (process {os.getpid()})")
    return pool
