"""Streaming region reads: one ``read_region`` per block of cells, patches cut from the block.

The loader is fed :class:`ReadTask` objects by a sampler, so one DataLoader (and its workers, each
with its own cached slide handles) streams many slides back to back: the next slide is read while
this one computes.

A task's :class:`~wsi_embed.decode.DecodePlan` says where JPEG tiles are decoded: in the worker
(uint8 patches come back) or on the device (the worker sends the region's tile streams; the main
process decodes them there). :meth:`RegionBatch.to_device` gives patches on the device either way.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .decode import CPU_PLAN, CpuFallback, DecodePlan, RawTiles, collect_raw, decode_to_device
from .errors import WsiEmbedError
from .grid import Grid, Region
from .planner import BACKGROUND_NICE
from .slide import Slide, open_slide
from . import slots
from .slots import Slot, SlotPool, pool_for
from .tiles import TileSource

log = logging.getLogger(__name__)

_MAX_OPEN_SLIDES = 4


@dataclass(frozen=True)
class ReadTask:
    """Read one block at ``level`` and cut ``read_px`` squares at the given level offsets."""

    slide_key: int
    path: str
    backend: str
    level: int
    location: tuple[int, int]  # level-0 top-left of the block
    size: tuple[int, int]  # block size in level pixels
    offsets: tuple[tuple[int, int], ...]  # (x, y) of each cell inside the block, level pixels
    read_px: int
    region: int  # region index within the slide
    level_xy: tuple[int, int] = (0, 0)  # level-pixel top-left of the block (native tile reads)
    decode: DecodePlan = CPU_PLAN  # where JPEG tiles are decoded (wsi_embed.decode.resolve_decode)


@dataclass(frozen=True)
class EndOfSlide:
    slide_key: int


@dataclass
class RegionBatch:
    """One region's cells: decoded ``patches`` (CPU path) or its JPEG tile streams (``raw``, decoded
    by :meth:`to_device`). ``error`` set: the read failed and there is neither."""

    slide_key: int
    region: int
    patches: torch.Tensor | None  # (n, read_px, read_px, 3) uint8
    error: str | None = None
    read_s: float = 0.0  # time the loader took to read, decode and cut these patches
    raw: RawTiles | None = None  # device decoding: the tile streams and the cells' geometry
    decoder: str = ""  # what decoded these patches (for a raw region: known after to_device)
    fallback: str | None = None  # why these patches were not decoded on the device as asked
    decode_s: float = 0.0  # main-process time decoding and cutting a raw region (in to_device)
    slot: Slot | None = None  # patches written into a shared slot by a worker (see wsi_embed.slots)

    @property
    def count(self) -> int:
        """Patches in this region."""
        if self.patches is not None:
            return int(self.patches.shape[0])
        return len(self.raw) if self.raw is not None else 0

    def __setstate__(self, state: dict) -> None:
        """Arriving from a worker: its slot becomes ``patches``, viewing the shared memory (the
        slot is free again once those views are gone), whatever is done with this region next."""
        self.__dict__.update(state)
        if self.slot is not None:
            self.patches, self.slot = pool_for(self.slot).lease(self.slot), None

    def pin_memory(self) -> "RegionBatch":  # called by DataLoader's pin thread
        if self.patches is not None:
            self.patches = self.patches.pin_memory()  # the slot's view is dropped here: it is free again
        return self

    def to_device(self, device: torch.device | str, copy_stream: "torch.cuda.Stream | None" = None) -> torch.Tensor:
        """(n, read_px, read_px, 3) uint8 patches on ``device``, whichever path made them: decoded
        patches are copied (from pinned memory on CUDA, without blocking, on ``copy_stream`` when
        given, so the copy overlaps the encoder's work on the compute stream); tile streams are decoded
        there in one batch and the cells cut on the device. Sets ``decoder`` and, on a fallback,
        ``fallback``. Raises :class:`~wsi_embed.errors.WsiEmbedError` for a tile no decoder reads."""
        if self.raw is not None:
            done = decode_to_device(self.raw, device)
            self.raw = None  # the streams are spent
            self.patches = done.patches  # count works after, and a second call is a no-op
            self.decoder, self.decode_s = done.decoder, done.seconds
            self.fallback = self.fallback or done.fallback
            return done.patches
        if self.patches is None:
            raise ValueError(f"region {self.region} has no patches: {self.error}")
        if copy_stream is None:
            return self.patches.to(device, non_blocking=True)
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(copy_stream):
            patches = self.patches.to(device, non_blocking=True)
        compute.wait_stream(copy_stream)  # work queued from here on waits for the copy; earlier work does not
        patches.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        return patches


def region_task(slide_key: int, path: str, backend: str, grid: Grid, region: Region,
                decode: DecodePlan = CPU_PLAN) -> ReadTask:
    """Geometry of one region read; offsets are whole level pixels (see grid module)."""
    xs = grid.level_x(np.arange(region.c0, region.c1))
    ys = grid.level_y(np.arange(region.r0, region.r1))
    lx0, ly0 = int(xs[0]), int(ys[0])
    width, height = int(xs[-1]) + grid.read_px - lx0, int(ys[-1]) + grid.read_px - ly0
    offsets = tuple((int(xs[c - region.c0]) - lx0, int(ys[r - region.r0]) - ly0) for r, c in region.cells)
    ds = grid.level_downsample
    return ReadTask(slide_key, path, backend, grid.level, (round(lx0 * ds), round(ly0 * ds)),
                    (width, height), offsets, grid.read_px, region.index, (lx0, ly0), decode)


def _patch_tensor(n: int, size: int) -> torch.Tensor:
    """(n, size, size, 3) uint8. In a loader worker the tensor is born in shared memory, so handing
    it to the main process costs no extra copy."""
    out = torch.empty((n, size, size, 3), dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    return out


def cut_patches(block: np.ndarray, offsets: Iterable[tuple[int, int]], size: int,
                out: np.ndarray | None = None) -> torch.Tensor:
    offsets = list(offsets)
    patches = _patch_tensor(len(offsets), size) if out is None else torch.from_numpy(out)
    view = patches.numpy()
    for i, (x, y) in enumerate(offsets):
        view[i] = block[y : y + size, x : x + size]
    return patches


def read_cells_native(tiles: TileSource, task: ReadTask, out: np.ndarray | None = None) -> torch.Tensor:
    """Each cell straight from the raw tiles it touches; a tile shared by cells is decoded once.
    ``out``: the (n, read_px, read_px, 3) uint8 array to fill (default: a new tensor)."""
    patches = _patch_tensor(len(task.offsets), task.read_px) if out is None else torch.from_numpy(out)
    view = patches.numpy()
    decoded: dict = {}
    x0, y0 = task.level_xy
    for i, (x, y) in enumerate(task.offsets):
        tiles.read_into(task.level, x0 + x, y0 + y, view[i], decoded)
    return patches


class _HandleCache:
    """Per-process slide handles: never shared across processes, reused across regions."""

    def __init__(self) -> None:
        self._open: OrderedDict[tuple[str, str], tuple[Slide, TileSource | None]] = OrderedDict()

    def get(self, path: str, backend: str) -> tuple[Slide, TileSource | None]:
        """The slide, and native tile access to it where its format allows (TIFF family)."""
        key = (path, backend)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        slide = open_slide(path, backend=backend)
        tiles = TileSource.open(path, slide.level_dimensions) if _native_candidate(path) else None
        self._open[key] = (slide, tiles)
        while len(self._open) > _MAX_OPEN_SLIDES:
            _, old = self._open.popitem(last=False)
            _close(old)
        return slide, tiles

    def clear(self) -> None:
        for handles in self._open.values():
            _close(handles)
        self._open.clear()


def _native_candidate(path: str) -> bool:
    """Files whose tiles tifffile indexes as plainly as the readers do (NDPI's JPEGs are not tiles)."""
    return path.lower().endswith((".svs", ".tif", ".tiff"))


def _close(handles: tuple) -> None:
    for handle in handles:
        try:
            if handle is not None:
                handle.close()
        except Exception:  # closing a broken handle must not mask the real error
            pass


class _ThreadHandles(threading.local):
    """One cache per thread: dask workers run several in-process slides in threads at once."""

    def __init__(self) -> None:
        self.cache = _HandleCache()


_HANDLES_BY_THREAD = _ThreadHandles()


class RegionDataset(Dataset):
    """Maps a task to its patches. Read errors come back as data, so one bad slide stops only itself.

    With a ``pool`` (loader workers), patches are written into a shared slot and only the slot's
    number crosses processes."""

    def __init__(self, pool: SlotPool | None = None):
        self.pool = pool

    def _out(self, task: ReadTask) -> tuple[Slot | None, np.ndarray | None]:
        taken = self.pool.take((len(task.offsets), task.read_px, task.read_px, 3)) if self.pool else None
        return taken if taken is not None else (None, None)

    def __getitem__(self, task):
        if isinstance(task, EndOfSlide):
            return task
        started = time.perf_counter()
        try:
            slide, tiles = _HANDLES_BY_THREAD.cache.get(task.path, task.backend)
            native = tiles is not None and tiles.supports(task.level)
            fallback = None
            if task.decode.on_device:
                if native:
                    try:
                        raw = collect_raw(tiles, task, task.decode)
                        return RegionBatch(task.slide_key, task.region, None, read_s=time.perf_counter() - started,
                                           raw=raw, decoder=task.decode.decoder)
                    except CpuFallback as exc:
                        fallback = str(exc)
                else:
                    fallback = "not a tiled TIFF level this loader reads natively"
            slot, out = self._out(task)
            try:
                if native:
                    patches = read_cells_native(tiles, task, out)
                    decoder = tiles.levels[task.level].decoder
                else:
                    block = slide.read_region(task.location, task.level, task.size)
                    patches = cut_patches(block, task.offsets, task.read_px, out)
                    decoder = f"read_region ({slide.backend})"
            except BaseException:
                if slot is not None:
                    self.pool.put_back(slot)
                raise
            return RegionBatch(task.slide_key, task.region, None if slot else patches,
                               read_s=time.perf_counter() - started, decoder=decoder, fallback=fallback, slot=slot)
        except WsiEmbedError as exc:
            return RegionBatch(task.slide_key, task.region, None, str(exc))
        except Exception as exc:  # the slide's own failure, reported per slide, not a crash
            log.debug("read failed", exc_info=True)
            return RegionBatch(task.slide_key, task.region, None,
                               f"{task.path}: read failed ({type(exc).__name__}: {exc})")

    def __len__(self) -> int:  # pragma: no cover - the sampler drives iteration
        raise TypeError("RegionDataset is fed by a sampler")


class TaskFeed(Sampler):
    """A one-shot sampler over an iterator of tasks (built lazily, slide after slide)."""

    def __init__(self, tasks: Iterator):
        self._tasks = tasks

    def __iter__(self):
        return self._tasks


class BurstReader:
    """In-process reads for an encoder on the CPU: whenever the main thread needs patches, the
    next regions (about ``patches`` cells, never past the end of a slide) are read at once by
    ``threads`` threads (libjpeg-turbo releases the GIL), and handed over only when all are done.
    Nothing reads while the encoder computes, so decoding never competes with its threads, yet it
    uses every core.

    Items come out in task order, as from a ``DataLoader`` without workers; within a burst the
    largest regions are read first."""

    def __init__(self, tasks: Iterator, *, threads: int, patches: int):
        self._tasks = iter(tasks)
        self.threads = max(1, threads)
        self.patches = max(1, patches)

    def _burst(self) -> list:
        burst, cells = [], 0
        for task in self._tasks:
            burst.append(task)
            if isinstance(task, EndOfSlide):
                break  # the next slide's tasks may still be in preparation: read what is here now
            cells += len(task.offsets)
            if cells >= self.patches:
                break
        return burst

    def __iter__(self) -> Iterator[RegionBatch | EndOfSlide]:
        dataset, caches = RegionDataset(), []
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="wsi-embed-read",
                                  initializer=lambda: caches.append(_HANDLES_BY_THREAD.cache))
        try:
            while burst := self._burst():
                # largest regions first, so the threads finish a burst together (the burst is a barrier)
                order = sorted(range(len(burst)), key=lambda i: -len(getattr(burst[i], "offsets", ())))
                reads = {i: pool.submit(dataset.__getitem__, burst[i]) for i in order}
                yield from [reads[i].result() for i in range(len(burst))]  # all read before any is used
        finally:
            # interrupted or failed here: reads not started are dropped, handles left open rather than closed mid-read
            pool.shutdown(wait=True, cancel_futures=True)
            for cache in caches:  # the threads' own slide handles
                cache.clear()


def _worker_init(_: int, *, nice: int = 0) -> None:
    _HANDLES_BY_THREAD.cache.clear()  # handles inherited through fork belong to the parent
    torch.set_num_threads(1)
    if nice:
        os.nice(nice)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def reading_threads(device_type: str, workers: int) -> int:
    """In-process reading threads: on a CPU device without workers, one per core the encoder uses
    (a dask worker process running one torch thread reads with one)."""
    if device_type != "cpu" or workers:
        return 0
    return max(1, min(cpu_cores(), torch.get_num_threads()))


def default_workers(device_type: str = "cuda") -> int:
    """On a GPU every core can decode (workers run niced, the main thread keeps what it needs).
    On CPU the encoder needs the cores: one core decodes ~1000 patches/s, far more than a CPU
    encoder consumes, and a worker process competing with the encoder's threads costs more than
    decoding in between batches, so small machines decode in-process."""
    cores = cpu_cores()
    if device_type == "cpu":
        return 0 if cores < 8 else min(4, cores // 8)
    return max(1, min(16, cores))


# A slot holds the largest region a worker usually sends: 8 x 8 cells of 448 px reads (224 px at 40x).
SLOT_BYTES = 64 * 448 * 448 * 3


def make_loader(tasks: Iterator, *, workers: int, pin_memory: bool, prefetch: int = 4,
                yield_cpu: bool = False, threads: int = 0, burst: int = 512) -> DataLoader | BurstReader:
    """``threads`` (no ``workers``, no pinning): a :class:`BurstReader` reading ``burst`` cells at a time.

    ``yield_cpu``: workers run at a lower priority than the main process, so decoding fills
    the gaps instead of stalling the encoder's threads (CPU) or the thread feeding the GPU.

    Workers write patches into a :class:`~wsi_embed.slots.SlotPool` with a slot for every region in
    flight (``workers * prefetch``) and as many again for those the main process still holds; only
    the pages of slots in use are ever touched."""
    if workers == 0 and threads > 1 and not pin_memory:
        return BurstReader(tasks, threads=threads, patches=burst)
    kwargs, pool = {}, None
    if workers > 0:
        init = functools.partial(_worker_init, nice=BACKGROUND_NICE if yield_cpu else 0)
        kwargs = dict(prefetch_factor=prefetch, worker_init_fn=init, persistent_workers=False)
        pool = _slot_pool(2 * workers * prefetch + 8) if slots.usable() else None
    return DataLoader(
        RegionDataset(pool), batch_size=None, sampler=TaskFeed(tasks), num_workers=workers,
        pin_memory=pin_memory, collate_fn=None, **kwargs,
    )


def _slot_pool(n: int) -> SlotPool | None:
    """Shared slots for ``n`` regions, or None (regions then travel through torch's own shared memory)
    when the address space cannot hold them (many workers under a tight overcommit limit)."""
    try:
        return SlotPool(n, SLOT_BYTES)
    except OSError as exc:
        log.warning("no shared slots for %d regions (%s); workers hand patches over without them", n, exc)
        return None


def release_handles() -> None:
    _HANDLES_BY_THREAD.cache.clear()
