"""The streaming executor: loader items in, encoder batches on the device, blocks out to the stores.

- **Full batches.** Batches span region and slide boundaries; each row carries its slide and
  region, and lands in its own slide's store. A slide commits when its end has been seen and every
  one of its rows is written.
- **No host sync per batch.** Outputs are copied back into pinned buffers behind a CUDA event and
  read one batch later, so the device always has the next batch queued.
- **No loop per patch.** A batch's rows are scattered into their region blocks by array indexing.
- **Writes off the main thread.** float16 conversion, compression and chunk files, and the QC
  picture, are written by one writer thread behind a bounded queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import artefacts
from .errors import LockLost, SlideChanged, WsiEmbedError, store_write_error
from .grid import Grid
from .infer import DeviceClock
from .jobs import EmbedOptions, SlideJob, SlideResult
from .qc import qc_path_for, render_store_qc, write_png_atomic
from .slide import fingerprint
from .store import StoreWriter

log = logging.getLogger(__name__)

MAX_QUEUED_WRITES = 64  # blocks waiting for the writer thread before the main thread waits too


@dataclass
class RegionBuffer:
    r0: int
    c0: int
    cells: np.ndarray  # (n, 2) row, col of the cells to embed, in read order
    blocks: dict  # encoder -> (h, w, dim) float32, NaN-filled
    remaining: int


@dataclass
class SlideRun:
    """One slide on its way through the executor."""

    job: SlideJob
    started: float
    result: SlideResult
    writer: StoreWriter | None = None
    grid: Grid | None = None
    groups: dict = field(default_factory=dict)  # encoder name -> EncoderGroupWriter
    regions: dict = field(default_factory=dict)  # region index -> RegionBuffer
    qc_image: object | None = None
    failed: bool = False
    block: int = 8
    lock: object | None = None  # SlideLock held while this slide is being embedded
    cells_done: int = 0
    rows_in_flight: int = 0  # rows batched or on the device, not yet in their region blocks
    ended: bool = False  # the loader has delivered every region
    writes: list = field(default_factory=list)  # writer-thread futures of this slide's blocks
    fingerprint: str | None = None  # of the slide file when it was prepared; checked again at commit
    decoders: object | None = None  # decode.DecoderTally: which decoders made the patches
    artefacts: object | None = None  # artefacts.Tally: per-cell blank/blur measures, on the device


@dataclass
class RunStats:
    """Where the time went in one run (filled in place; for benchmarks)."""

    patches: int = 0
    wait_s: float = 0.0  # the main thread waiting for the loader
    total_s: float = 0.0
    read_s: float = 0.0  # loader time reading, decoding and cutting patches (summed over processes)
    device_s: float = 0.0  # the encoders busy (CUDA events on a GPU)
    decode_s: float = 0.0  # the main process decoding tiles for the device (--decode gpu)
    first_batch_s: float | None = None  # from the start to the first batch's embeddings
    first_batch_patches: int = 0  # patches counted by then
    workers: int = 0

    @property
    def loader_wait_fraction(self) -> float:
        return self.wait_s / self.total_s if self.total_s else 0.0

    @property
    def steady_patches_per_s(self) -> float | None:
        """The rate after the first batch: slide preparation, writes and slide boundaries included;
        None when there is nothing after it (a run of one batch)."""
        if self.first_batch_s is None or self.total_s <= self.first_batch_s or self.patches <= self.first_batch_patches:
            return None
        return (self.patches - self.first_batch_patches) / (self.total_s - self.first_batch_s)

    def busy(self) -> dict:
        """Fractions of the run's wall time each stage was busy."""
        wall = self.total_s or float("inf")
        return {"decode": round(self.read_s / (max(1, self.workers) * wall), 3),
                "main_thread": round(1 - self.wait_s / wall, 3),
                "device": round(self.device_s / wall, 3)}


class _Writer:
    """One thread for store writes and pictures; at most ``limit`` queued before submit waits."""

    def __init__(self, limit: int = MAX_QUEUED_WRITES):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-embed-writer")
        self._slots = threading.BoundedSemaphore(limit)

    def submit(self, fn: Callable, *args) -> Future:
        self._slots.acquire()
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Executor:
    """Feeds loader items to the encoders and their outputs to the stores; see the module doc.

    ``add`` and ``end_slide`` return the results of slides that completed, in slide order.
    """

    def __init__(self, runners: Callable[[], list], device: torch.device, opts: EmbedOptions, stats: RunStats,
                 progress: Callable[[str, int, int], None] | None = None):
        self.runners = runners  # the encoders' runners, loaded on first need
        self.device, self.opts, self.stats = device, opts, stats
        self.progress = progress
        self.clock = DeviceClock(device)
        self._pending: list[tuple[torch.Tensor, SlideRun, int]] = []  # (patches, run, region)
        self._pending_rows = 0
        self._in_flight: deque = deque()  # launched batches whose outputs are not yet read
        self._order: deque[SlideRun] = deque()  # slides in arrival order, until their result is out
        self._writer = _Writer()
        self._started = time.perf_counter()

    # -- input -----------------------------------------------------------------------------------
    def begin(self, run: SlideRun) -> None:
        self._order.append(run)

    def add(self, run: SlideRun, region: int, patches: torch.Tensor) -> list[SlideResult]:
        if run.failed:
            return self._ready()
        artefacts.measure(run, region, patches)  # hook: blank/blur measures of the uint8 patches
        if self._pending and self._pending[0][0].shape[1:] != patches.shape[1:]:
            self._launch(self._pending_rows)  # another read size: a batch holds one size only
        self._pending.append((patches, run, region))
        self._pending_rows += patches.shape[0]
        run.rows_in_flight += patches.shape[0]
        while self._pending_rows >= self.opts.batch_size:
            self._launch(self.opts.batch_size)
        return self._ready()

    def end_slide(self, run: SlideRun) -> list[SlideResult]:
        run.ended = True
        return self._ready()

    def fail(self, run: SlideRun, error: str) -> list[SlideResult]:
        self._fail(run, error)
        return self._ready()

    def close(self) -> list[SlideResult]:
        """Flush the last partial batch and every slide still open."""
        while self._pending_rows:
            self._launch(self._pending_rows)
        while self._in_flight:
            self._drain()
        results = self._ready()
        self._writer.close()
        return results

    def shutdown(self) -> None:
        """After an interrupt: let queued writes finish so no file appears after the cleanup."""
        self._writer.close()

    # -- the device ------------------------------------------------------------------------------
    def _launch(self, n: int) -> None:
        """Run the encoders on the next ``n`` pending rows; read the previous batch's outputs."""
        parts, segments, taken = [], [], 0
        while taken < n:
            patches, run, region = self._pending[0]
            k = min(n - taken, patches.shape[0])
            parts.append(patches[:k])
            segments.append((run, region, k))
            if k == patches.shape[0]:
                self._pending.pop(0)
            else:
                self._pending[0] = (patches[k:], run, region)
            taken += k
        self._pending_rows -= n
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        wanted = {name for run, _, _ in segments for name in run.groups}
        with self.clock:
            outs = {r.encoder.config.name: r(x) for r in self.runners() if r.encoder.config.name in wanted}
        host, event = {}, None
        if self.device.type == "cuda":
            for name, out in outs.items():
                host[name] = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host[name].copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = outs
        self._in_flight.append((event, host, segments))
        while len(self._in_flight) > (1 if event is not None else 0):
            self._drain()

    def _drain(self) -> None:
        event, host, segments = self._in_flight.popleft()
        if event is not None:
            event.synchronize()
        outs = {name: t.float().numpy() for name, t in host.items()}
        if self.stats.first_batch_s is None:
            self.stats.first_batch_s = time.perf_counter() - self._started
            self.stats.first_batch_patches = sum(k for _, _, k in segments)
        row = 0
        for run, region, k in segments:
            run.rows_in_flight -= k
            if not run.failed:
                self._scatter(run, region, {name: outs[name][row : row + k] for name in run.groups})
                run.cells_done += k
                if self.progress is not None:
                    self.progress(run.job.slide_id, run.cells_done, run.result.cells)
            row += k

    def _scatter(self, run: SlideRun, region: int, outs: dict) -> None:
        """Put rows of one region into its blocks (array indexing); a complete block goes to the
        writer thread. Rows of a region arrive in read order."""
        buf = run.regions[region]
        k = next(iter(outs.values())).shape[0] if outs else 0
        done = len(buf.cells) - buf.remaining
        cells = buf.cells[done : done + k]
        for name, out in outs.items():
            block = buf.blocks.get(name)
            if block is None:
                h = min(run.block, run.grid.rows - buf.r0)
                w = min(run.block, run.grid.cols - buf.c0)
                block = buf.blocks[name] = np.full((h, w, out.shape[1]), np.nan, dtype=np.float32)
            block[cells[:, 0] - buf.r0, cells[:, 1] - buf.c0] = out
        buf.remaining -= k
        if buf.remaining == 0:
            for name, block in buf.blocks.items():
                run.writes.append(self._writer.submit(_write_block, run.groups[name], buf.r0, buf.c0, block,
                                                      self.opts.dtype))
            del run.regions[region]

    # -- slides ----------------------------------------------------------------------------------
    def _ready(self) -> list[SlideResult]:
        """Finish the slides at the head of the order whose rows are all written."""
        results = []
        while self._order and self._order[0].ended and self._order[0].rows_in_flight == 0:
            results.append(self._finish(self._order.popleft()))
        return results

    def _finish(self, run: SlideRun) -> SlideResult:
        result = run.result
        if not run.failed and result.status != "skipped":
            try:
                self._commit(run)
            except WsiEmbedError as exc:
                self._fail(run, str(exc))
            except OSError as exc:  # e.g. a full disk while writing or committing
                self._fail(run, str(store_write_error(run.job.path, run.writer.final, exc)))
            except RuntimeError as exc:  # an internal inconsistency: this slide fails loudly
                if "DataLoader worker" in str(exc):  # a killed worker, raised here by torch: not this slide's
                    raise
                log.exception("internal error finishing %s", run.job.path)
                self._fail(run, f"{run.job.path}: internal error ({exc}); please report it")
        release(run)  # only after the store is renamed into place (or cleaned up)
        result.seconds = time.perf_counter() - run.started
        return result

    def _commit(self, run: SlideRun) -> None:
        result = run.result
        for future in run.writes:
            future.result()  # raises the writer thread's error for this slide
        run.writes.clear()
        if run.regions:
            raise RuntimeError(f"{len(run.regions)} regions were not completed")
        if fingerprint(run.job.path) != run.fingerprint:
            raise SlideChanged(f"{run.job.path}: the file changed while it was being embedded; nothing was kept. "
                               "Rerun once the copy or export has finished")
        if run.lock is not None and not run.lock.held():  # judged dead and taken over: do not commit
            raise LockLost(f"{run.job.path}: another process took over {run.lock.path}; "
                           "this run's copy is discarded (raise --lock-stale-after if hosts are slow)")
        try:
            artefacts.finalise(run, self.opts)  # hook: measures stored, blank/blurry cells dropped
            for group in run.groups.values():
                if run.decoders is not None:  # known only now: a tile may have fallen back
                    group.group.attrs.update({"encoder": {**group.group.attrs["encoder"], **run.decoders.attrs()}})
                run.writer.mark_complete(group, cells=result.cells)
            result.store = str(run.writer.commit())
        except OSError as exc:
            raise store_write_error(run.job.path, run.writer.final, exc) from None
        result.status = "done"
        if self.opts.qc:  # after the commit: no picture without its store; encoded off this thread
            path = qc_path_for(run.writer.final.parent, run.job.slide_id)
            result.qc = str(path)
            # the lock is held until the picture is in place: a run killed before that leaves its
            # lock, and the next run, taking it over, draws the picture again
            lock, run.lock = run.lock, None
            self._writer.submit(_write_qc, run.qc_image, run.writer.final, path, lock)

    def _fail(self, run: SlideRun, error: str) -> None:
        run.failed = True
        run.result.status, run.result.error = "failed", error
        for future in run.writes:  # nothing may be written after the cleanup
            future.exception()
        run.writes.clear()
        if run.writer is not None:
            run.writer.abort()
        release(run)  # after abort: the next owner must not see our temporaries


def release(run: SlideRun) -> None:
    if run.lock is not None:
        run.lock.release()
        run.lock = None


def _write_block(group, r0: int, c0: int, block: np.ndarray, dtype: str) -> None:
    group.write_block(r0, c0, block.astype(dtype))


def _write_qc(image, store, path, lock=None) -> None:
    """A group added to an existing store has no picture yet: its caption (encoders, random
    weights) is redrawn from the store. ``lock``: the slide's, released once the picture is written."""
    try:
        if lock is not None:
            lock.heartbeat(force=True)  # it waited behind other slides' writes
        write_png_atomic(image if image is not None else render_store_qc(store), path)
    except (OSError, WsiEmbedError) as exc:
        log.warning("%s: store complete, but the QC picture could not be written (%s)", path.name, exc)
    except Exception as exc:  # noqa: BLE001 - a damaged store read back: said, never lost in the future
        log.warning("%s: store complete, but the QC picture could not be drawn (%s: %s)", path.name,
                    type(exc).__name__, exc)
    finally:
        if lock is not None:
            lock.release()
