"""``embed_slide``: one slide in, one verified store out. Every driver (CLI, cohort, dask) calls it,
or ``embed_slides`` which streams several slides through one loader and one set of encoders.

This module decides what each slide needs (resume, locks), prepares it ahead in a thread (its
:mod:`~wsi_embed.plan` and store) and hands loader items to the :mod:`~wsi_embed.executor`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import zarr

from .decode import DecodePlan, DecoderTally, resolve_decode
from .errors import InvalidOption, OutputNotWritable, RunWideError, StoreConflict, WsiEmbedError, store_write_error
from .executor import Executor, RegionBuffer, RunStats, SlideRun, release
from .grid import Grid, plan_regions
from .ids import id_problem
from .infer import EncoderRunner, resize_method, select_device, select_precision
from .jobs import EmbedOptions, SlideJob, SlideResult, model_name, slide_id_for
from .loader import EndOfSlide, default_workers, make_loader, reading_threads, region_task, release_handles
from .locks import LockError, lock_path, try_lock
from .plan import Cancelled
from .planner import Planner, default_prepare_processes
from .qc import qc_path_for, qc_title, render_qc, render_store_qc, write_png_atomic
from .resume import options_conflict, Resume, plan_resume
from .slide import ensure_intact, fingerprint, open_slide, resolve_mpp
from .store import (StoreWriter, completed_encoders, damage_reason, ensure_writable, folders_to_make, read_guard,
                    remove_if_empty, remove_stale_temporaries, restore_interrupted_repair, store_path)

log = logging.getLogger(__name__)

PREPARE_AHEAD = 2  # slides prepared ahead of the one being embedded: small biopsies never wait


def _prepare(job: SlideJob, key: int, out_dir: Path, encoders: list, opts: EmbedOptions, precision: str,
             resume: Resume, cancel: threading.Event, decode: DecodePlan, planner: Planner, device_type: str):
    """Open, measure, find tissue, plan the grid and open the store. Returns (run, tasks)."""
    run = SlideRun(job, time.perf_counter(), SlideResult(str(job.path), job.slide_id, "failed",
                                                          note=resume.note))
    final = store_path(out_dir, job.slide_id)
    remove_stale_temporaries(out_dir, job.slide_id)
    append = not resume.rebuild and final.exists() and bool(completed_encoders(final))
    with read_guard(final, "the store's attributes"):
        conflict = _geometry_conflict(final, job, opts) if append else None
    if conflict and not opts.overwrite:
        raise StoreConflict(conflict)
    if conflict:  # --overwrite with other grid options or another slide: rebuild it all
        append = False
        others = [n for n in completed_encoders(final) if n not in {e.config.name for e in encoders}]
        log.warning("%s: rebuilding it for this slide file and these options (--overwrite)%s; the old store is "
                    "kept until the new one is complete", final,
                    f", without its other encoder groups ({', '.join(others)})" if others else "")
    # the writer is left open for the executor to commit; any failure here removes its temporaries
    with open_slide(job.path, backend=opts.backend) as slide, StoreWriter(final, append=append) as writer:
        mpp = resolve_mpp(slide, job.slide_mpp, warn=False)  # _preflight warned
        if append:  # add (or, under --overwrite, replace) groups; other groups are kept
            run.fingerprint = fingerprint(job.path)
            with read_guard(final, "mask"):
                grid, mask, block = _reuse_geometry(writer)
        else:
            grid, mask, block = _new_geometry(slide, mpp, job, writer, opts, run, encoders, cancel, planner)
        backend = slide.backend
        with _writing(job, out_dir):
            for enc in encoders:
                if enc.config.name not in resume.todo:
                    continue
                resized = grid.read_px != enc.config.input_size
                attrs = {**enc.attrs(), "precision": precision, "dtype": opts.dtype,
                         "input_resized": resized,
                         "input_resize": f"{grid.read_px}px read -> {enc.config.input_size}px encoder input",
                         "input_resize_method": resize_method(device_type) if resized else None}
                run.groups[enc.config.name] = writer.add_encoder(
                    enc.config.name, dim=enc.config.dim, dtype=opts.dtype, chunk=block, attrs=attrs)
    run.writer, run.grid, run.block = writer, grid, block

    def stop() -> None:  # a huge grid's regions take seconds to plan: an interrupt must not wait
        if cancel.is_set():
            writer.abort()
            raise Cancelled

    regions = plan_regions(grid, mask, block, should_stop=stop)
    for region in regions:
        blocks = {n: None for n in run.groups}
        cells = np.asarray(region.cells, dtype=np.int64).reshape(-1, 2)
        run.regions[region.index] = RegionBuffer(region.r0, region.c0, cells, blocks, len(cells))
    run.result.cells = int(mask.sum())
    run.result.encoders = list(run.groups)
    run.decoders = DecoderTally(job.slide_id)
    tasks = [region_task(key, str(job.path), backend, grid, r, decode=decode) for r in regions]
    return run, tasks


@contextlib.contextmanager
def _writing(job: SlideJob, out_dir: Path):
    """A write that fails (full disk, quota, a name too long) fails this slide with one line."""
    try:
        yield
    except OSError as exc:
        raise store_write_error(job.path, store_path(out_dir, job.slide_id), exc) from None


def _preflight(job: SlideJob, opts: EmbedOptions) -> None:
    ensure_intact(job.path)  # first: a cut file may have lost the metadata that holds its resolution
    with open_slide(job.path, backend=opts.backend) as slide:
        resolve_mpp(slide, job.slide_mpp)


def _new_geometry(slide, mpp, job, writer: StoreWriter, opts: EmbedOptions, run: SlideRun, encoders: list,
                  cancel: threading.Event, planner: Planner):
    plan = planner.plan(slide, mpp, job, opts, cancel)
    run.fingerprint = plan.info.fingerprint
    coords = plan.grid.coords()
    if cancel.is_set():
        raise Cancelled
    with _writing(job, writer.final.parent):
        writer.create(attrs=plan.attrs(), mask=plan.mask, tissue_fraction=plan.fraction, coords=coords,
                      thumbnail=plan.thumb.image, tissue_mask=plan.tissue_mask, chunk=plan.block,
                      extra=plan.extra_arrays())
    if cancel.is_set():
        raise Cancelled
    if opts.qc:
        title = qc_title(job.slide_id, plan.cells, plan.grid.patch_px, plan.grid.target_mpp, opts.min_tissue,
                         [(e.config.name, e.weights.random) for e in encoders])
        run.qc_image = render_qc(plan.thumb.image, plan.tissue_mask, plan.grid, coords, plan.mask,
                                 scale_x=plan.thumb.scale_x, scale_y=plan.thumb.scale_y, title=title,
                                 ink=plan.ink_mask, ink_removed=opts.tissue.pen_marks == "remove")
    return plan.grid, plan.mask, plan.block


def _geometry_conflict(final: Path, job: SlideJob, opts: EmbedOptions) -> str | None:
    """Why groups cannot be added to this existing store: another slide file, another grid or other
    tissue options."""
    root = zarr.open_group(str(final), mode="r", zarr_format=3)
    if root.attrs["slide"].get("fingerprint") != fingerprint(job.path):
        return (f"{final}: holds embeddings of another file ({root.attrs['slide'].get('path')}), not {job.path}; "
                "use another --out, or --overwrite to replace it")
    return options_conflict(final, root.attrs.asdict(), job, opts)


def _reuse_geometry(writer: StoreWriter):
    """The existing store's grid, mask and region side (new regions must match its chunks)."""
    root = writer.open_existing()
    g = dict(root.attrs["grid"])
    mask = root["mask"]
    return Grid.from_attrs(g), mask[...], int(g.get("block") or mask.chunks[0])


# -- the streaming loop ------------------------------------------------------------------------
class _Models:
    """Encoders are loaded on first need, so a rerun with nothing to do never loads a model."""

    def __init__(self, models: Sequence, weights: str, device: torch.device, precision: str, compile: bool):
        self.names = [model_name(m) for m in models]
        if len(set(self.names)) != len(self.names):
            raise InvalidOption("the same model is named twice in --model")
        self._models, self._weights = list(models), weights
        self._device, self._precision, self._compile = device, precision, compile
        self.encoders: list = []
        self.runners: list[EncoderRunner] = []
        self._error: RunWideError | None = None
        self._lock = threading.Lock()  # prep threads may ask at once

    def load(self) -> list:
        with self._lock:
            return self._load_once()

    def _load_once(self) -> list:
        if self._error is not None:  # a run-wide failure is met once, not once per prepared slide
            raise self._error
        try:
            return self._load()
        except RunWideError as exc:
            self._error = exc
            raise

    def _load(self) -> list:
        if not self.encoders:
            from .encoders import Encoder, load_encoder

            encoders = [m if isinstance(m, Encoder) else load_encoder(m, self._weights) for m in self._models]
            try:
                runners = [EncoderRunner(e, self._device, self._precision, compile=self._compile)
                           for e in encoders]
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # e.g. a GPU that is full
                raise InvalidOption(f"cannot put the encoders on {self._device}: {exc}; "
                                    "free the device or choose another with --device") from exc
            self.encoders, self.runners = encoders, runners  # together, so a failure leaves neither
        return self.encoders


def _refuse_in_a_starting_process() -> None:
    """Slides are planned in spawned processes, which import the caller's main module again: a
    script that calls this at top level would start a second run in each (the check CPython
    itself makes before spawning, on the same private flag)."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # SystemExit with a message: this helper process ends with one line, not a traceback
        raise SystemExit("error: embed_slides() was called while a helper process was starting: call it under "
                         "`if __name__ == \"__main__\":` in your script (wsi-embed plans slides in spawned "
                         "processes, which import the script again)")


def embed_slides(jobs: Iterable[SlideJob], out_dir: str | Path, models: Sequence = ("lunit-bt-rn50",),
                 weights: str = "auto", options: EmbedOptions = EmbedOptions(),
                 stats: RunStats | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> Iterator[SlideResult]:
    """Embed slides one after another through one loader; yields a result per slide, in order.

    A slide that fails is reported with ``status="failed"`` and leaves nothing behind; the others go
    on. Problems that concern every slide (weights, device, output directory) raise instead.
    ``models`` are registry names or loaded :class:`~wsi_embed.encoders.Encoder` objects.
    ``progress(slide_id, cells_done, cells_total)`` is called as batches complete.

    Each slide with work to do is locked (``<out>/.<slide_id>.lock``, see :mod:`wsi_embed.locks`)
    while it is embedded; a slide another live process holds is ``skipped`` with a note.
    """
    _refuse_in_a_starting_process()
    opts = options
    device = select_device(opts.device)
    precision = select_precision(opts.precision, device)
    decode_plan = resolve_decode(opts.decode, device)
    models_ = _Models(models, weights, device, precision, opts.compile)
    made = folders_to_make(out_dir)  # removed again if the run stops before writing anything
    out_dir = ensure_writable(Path(out_dir))
    runs: dict[int, SlideRun] = {}
    cancel = threading.Event()  # set when the run unwinds: a slide being prepared stops soon after
    held: list = []  # every lock taken, so an interrupt at any point releases it (release is idempotent)
    held_lock = threading.Lock()
    processes = (default_prepare_processes(device.type) if opts.prepare_processes is None
                 else opts.prepare_processes)
    planner = Planner(processes)
    ahead = max(PREPARE_AHEAD, processes + 1)

    def start(key: int, job: SlideJob) -> list:
        """Check, lock and prepare one slide; runs in the prep thread, one slide ahead."""
        run, tasks, lock = None, [], None
        problem = id_problem(job.slide_id, job.path)  # before any file is named after it
        resume = Resume(error=problem) if problem else plan_resume(
            out_dir, job, models_.names, weights, overwrite=opts.overwrite, verify=opts.verify, options=opts)
        if resume.error is None and not resume.nothing_to_do:
            try:
                lock, owner = _lock(out_dir, job, opts)
            except LockError as exc:  # this slide's lock path is unusable: this slide fails
                resume, lock, owner = Resume(error=str(exc)), None, None
            if lock is not None:
                with held_lock:  # several prep threads when slides are planned in processes
                    held[:] = [h for h in held if not h.released] + [lock]
                # another process may have finished it between our check and the lock, or a
                # repair killed mid-way may have left it moved aside
                try:
                    restore_interrupted_repair(out_dir, job.slide_id)
                except OSError as exc:  # left for a later run; this slide goes on as if it were not there
                    log.warning("%s: a repair's backup could not be put back (%s)", job.slide_id, exc)
                resume = plan_resume(out_dir, job, models_.names, weights, overwrite=opts.overwrite,
                                     verify=opts.verify, options=opts)
            elif resume.error is None:  # another live process is embedding it: not a failure
                run = _skipped(job, models_.names, out_dir,
                               f"locked by {owner.describe() if owner else 'another process'}")
        if run is None and resume.error is not None:
            run = _failed_run(job, resume.error)
        elif run is None and resume.nothing_to_do:
            run = _skipped(job, models_.names, out_dir, resume.skip_note, cells=resume.cells)
            _tidy_complete(out_dir, job, opts, lock)
        elif run is None:
            try:
                if cancel.is_set():
                    raise Cancelled
                _preflight(job, opts)  # a bad slide fails fast, before any model is loaded
                encoders = models_.load()  # errors here concern every slide: they raise
                run, tasks = _prepare(job, key, out_dir, encoders, opts, precision, resume, cancel, decode_plan,
                                      planner, device.type)
            except RunWideError:
                if lock is not None:
                    lock.release()
                raise
            except WsiEmbedError as exc:
                run = _failed_run(job, str(exc))
            except Exception as exc:  # one slide's unexpected failure must not stop the cohort
                log.exception("unexpected error preparing %s", job.path)
                run = _failed_run(job, f"{job.path}: {type(exc).__name__}: {exc}")
        if run.failed and lock is not None:
            lock.release()
            lock = None
        run.lock = lock
        runs[key] = run  # visible to the cleanup below as soon as it exists
        return tasks

    def feed():
        # Slides k+1 and k+2 are opened, tissue-detected and planned in a thread while slide k computes.
        with ThreadPoolExecutor(max_workers=max(1, processes), thread_name_prefix="wsi-embed-prep") as pool:
            queued: deque = deque()
            numbered = enumerate(jobs)

            def submit() -> None:
                nxt = next(numbered, None)
                if nxt is not None:
                    queued.append((nxt[0], pool.submit(start, *nxt)))

            for _ in range(ahead):
                submit()
            while queued:
                key, future = queued.popleft()
                try:
                    tasks = future.result()
                except BaseException:
                    cancel.set()
                    for _, other in queued:
                        other.cancel()
                    raise
                submit()
                try:
                    yield from tasks
                    yield EndOfSlide(key)
                except BaseException:  # closed or interrupted: the slide being prepared stops too
                    cancel.set()
                    raise

    workers = default_workers(device.type) if opts.workers is None else opts.workers
    task_feed = feed()
    # workers yield the CPU to this process: on CPU it runs the encoder, on CUDA it keeps the GPU fed;
    # without workers on CPU, the encoder's cores read in bursts between its steps
    threads = reading_threads(device.type, workers)
    loader = make_loader(task_feed, workers=workers, pin_memory=device.type == "cuda", yield_cpu=True,
                         threads=threads, burst=2 * opts.batch_size)
    stats = stats if stats is not None else RunStats()
    stats.workers = workers or threads
    executor = Executor(lambda: models_.runners, device, opts, stats, progress)
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # host-to-device copies
    begun: set[int] = set()
    started = time.perf_counter()
    items = None
    try:
        items = iter(loader)  # starts the workers and primes them (this prepares the first slide)
        while True:
            t0 = time.perf_counter()
            item = _next_item(items)
            stats.wait_s += time.perf_counter() - t0
            if item is None:
                break
            run = runs[item.slide_key]
            if item.slide_key not in begun:
                begun.add(item.slide_key)
                executor.begin(run)
            for r in list(runs.values()):  # rate-limited inside: keeps our locks fresh for other hosts
                if r.lock is not None:
                    r.lock.heartbeat()
            if isinstance(item, EndOfSlide):
                done = executor.end_slide(run)
            elif item.error:
                done = executor.fail(run, item.error)
            elif run.failed:
                done = executor.add(run, item.region, None)
            else:
                try:
                    patches = item.to_device(device, copy_stream)  # pinned copy, or the tiles decoded there
                except torch.cuda.OutOfMemoryError as exc:
                    raise InvalidOption(f"the GPU ran out of memory at --batch-size {opts.batch_size}; "
                                        "lower --batch-size") from exc
                except WsiEmbedError as exc:
                    done = executor.fail(run, str(exc))
                else:
                    stats.decode_s += item.decode_s
                    stats.patches += item.count
                    stats.read_s += item.read_s
                    run.decoders.add(item.decoder, item.count, item.fallback)
                    done = executor.add(run, item.region, patches)
            yield from _finished(done, runs)
        yield from _finished(executor.close(), runs)
    except RunWideError:  # e.g. the weights are missing: nothing was written
        remove_if_empty(made)
        raise
    except RuntimeError as exc:  # torch raises a dead worker's error wherever this thread is
        raise _worker_died(exc) or exc
    finally:
        stats.total_s = time.perf_counter() - started
        stats.device_s = executor.clock.seconds()
        del items  # stops the workers
        task_feed.close()  # waits for a slide being prepared, so its run is cleaned up too
        planner.close()
        executor.shutdown()
        for run in list(runs.values()):
            if run.writer is not None:
                run.writer.abort()  # does nothing once committed
            release(run)
        for lock in held:
            lock.release()
        release_handles()


def _finished(results: list[SlideResult], runs: dict) -> Iterator[SlideResult]:
    for result in results:
        key = next(k for k, r in runs.items() if r.result is result)
        runs.pop(key)
        yield result


def _lock(out_dir: Path, job: SlideJob, opts: EmbedOptions):
    """``try_lock`` with its errors sorted: a lock path this slide cannot use fails this slide
    (:class:`LockError`), anything else concerns the output folder and stops the run."""
    try:
        return try_lock(out_dir, job.slide_id, stale_after=opts.lock_stale_after)
    except LockError:
        raise
    except OSError as exc:
        raise OutputNotWritable(f"{out_dir}: cannot create the lock for {job.slide_id} ({exc.strerror or exc}); "
                                "check the output directory (free space, permissions)") from exc


def _next_item(items):
    """The loader's next item, or None at the end."""
    try:
        return next(items, None)
    except RuntimeError as exc:
        raise _worker_died(exc) or exc


def _worker_died(exc: RuntimeError) -> RunWideError | None:
    """A loader worker that was killed (the kernel's out-of-memory killer, a user) stops the run with
    one line; the slides already done are kept. None for any other RuntimeError."""
    if "DataLoader worker" not in str(exc):
        return None
    return RunWideError(f"a loader worker process ended abruptly ({str(exc).strip()}); completed stores are "
                        "kept: rerun to resume, with fewer --workers if the machine ran out of memory")


def _tidy_complete(out_dir: Path, job: SlideJob, opts: EmbedOptions, lock) -> None:
    """A complete store skipped on resume: clear what a killed owner left (its lock, temporaries)
    and draw a missing QC picture. Two stats when there is nothing to do."""
    qc_path = qc_path_for(out_dir, job.slide_id)
    if lock is None and not lock_path(out_dir, job.slide_id).exists() and (qc_path.exists() or not opts.qc):
        return
    own = lock is None
    if own:
        try:
            lock, _ = try_lock(out_dir, job.slide_id, stale_after=opts.lock_stale_after)
        except OSError:
            return
        if lock is None:  # a live owner: leave its files alone
            return
    try:
        remove_stale_temporaries(out_dir, job.slide_id)
        if opts.qc and (lock.took_over or not qc_path.exists()):  # its owner may have died mid-picture
            write_png_atomic(render_store_qc(store_path(out_dir, job.slide_id)), qc_path)
    except (OSError, WsiEmbedError) as exc:
        log.warning("%s: could not draw the missing QC picture (%s)", job.slide_id, exc)
    except Exception as exc:  # noqa: BLE001 - a codec or JSON error: the store's pictures are damaged
        log.warning("%s: could not draw the missing QC picture (%s); the store looks damaged: check it with "
                    "wsi-embed verify %s", job.slide_id, damage_reason(exc), store_path(out_dir, job.slide_id))
    finally:
        if own:
            lock.release()


def _failed_run(job: SlideJob, error: str) -> SlideRun:
    run = SlideRun(job, time.perf_counter(), SlideResult(str(job.path), job.slide_id, "failed", error=error))
    run.failed = True
    return run


def _skipped(job: SlideJob, names: Sequence[str], out_dir: Path, note: str = "complete", cells: int = 0) -> SlideRun:
    store = str(store_path(out_dir, job.slide_id)) if note.startswith("complete") else None
    return SlideRun(job, time.perf_counter(), SlideResult(
        str(job.path), job.slide_id, "skipped", encoders=list(names), store=store, note=note, cells=cells))


def embed_slide(path: str | Path, out_dir: str | Path, models: Sequence = ("lunit-bt-rn50",),
                weights: str = "auto", options: EmbedOptions = EmbedOptions(), *,
                slide_id: str | None = None, slide_mpp: float | None = None) -> SlideResult:
    """Embed one slide into ``<out_dir>/<slide_id>.zarr``. Returns its :class:`SlideResult`; a slide
    that cannot be embedded comes back with ``status="failed"`` and the reason in ``error``."""
    job = SlideJob(Path(path), slide_id or slide_id_for(Path(path)), slide_mpp)
    (result,) = list(embed_slides([job], out_dir, models, weights, options))
    return result
