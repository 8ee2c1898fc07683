"""``wsi-embed bench``: where the time goes. Loader alone, model alone, both together, and a naive
per-patch baseline, measured in one run on the same slides, batch size and precision."""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from .decode import resolve_decode
from .infer import EncoderRunner, select_device, select_precision
from .loader import EndOfSlide, cpu_cores, default_workers, make_loader, reading_threads, region_task, release_handles
from .grid import plan_regions
from .jobs import EmbedOptions
from .executor import RunStats
from .pipeline import embed_slides
from .plan import plan_slide
from .slide import open_slide, resolve_mpp


class PeakRss:
    """Samples the memory of this process and all its descendants (loader workers included).

    Uses PSS where the kernel gives it: forked workers share pages with the parent, and summing
    plain RSS would count those pages once per process. Reading PSS walks every mapping (5-20 ms
    for a process holding torch), so it is read at most once per ``overhead`` times as long as its
    last reading took (the sampler takes ~1/overhead of a core from what it measures). Between
    readings, every ``interval`` the cheap RSS is read and the shared part seen at the last PSS
    reading taken off, so a short-lived allocation still counts.
    """

    def __init__(self, interval: float = 0.05, overhead: float = 40.0):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._overhead = overhead
        self.peak = 0
        self.samples = 0  # PSS readings
        self.sampling_s = 0.0  # time spent sampling (the sampler's own cost)
        self._shared = 0  # RSS beyond PSS at the last PSS reading
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _processes(self) -> list:
        try:
            return [self._proc, *self._proc.children(recursive=True)]
        except Exception:  # a child that exited while being listed
            return [self._proc]

    @staticmethod
    def _sum(processes: list, read) -> int:
        total = 0
        for p in processes:
            try:
                total += read(p)
            except Exception:  # a worker that just exited
                pass
        return total

    def _sample(self, with_pss: bool) -> None:
        processes = self._processes()
        rss = self._sum(processes, lambda p: p.memory_info().rss)
        if with_pss:
            pss = self._sum(processes, lambda p: getattr(p.memory_full_info(), "pss", None) or p.memory_info().rss)
            self._shared = max(0, rss - pss)
            self.samples += 1
        self.peak = max(self.peak, rss - self._shared)

    def _run(self) -> None:
        next_pss = 0.0
        while not self._stop.is_set():
            started = time.perf_counter()
            with_pss = started >= next_pss
            self._sample(with_pss)
            took = time.perf_counter() - started
            self.sampling_s += took
            if with_pss:
                next_pss = started + self._overhead * took
            self._stop.wait(self._interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(with_pss=True)


def machine_info(device: torch.device) -> dict:
    from .machine import machine_info as describe

    base = describe()
    info = {"cpu": base["cpu"], "cores": base["cores"], "torch": torch.__version__, "python": base["python"],
            "device": str(device), "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plan(paths: Sequence[Path], opts: EmbedOptions, max_patches: int | None, decode=None,
          slide_mpp: float | None = None):
    """Read tasks for the tissue cells of each slide, up to ``max_patches`` in all."""
    tasks, read_px, left = [], None, max_patches
    for key, path in enumerate(paths):
        with open_slide(path, backend=opts.backend) as slide:
            geo = plan_slide(slide, resolve_mpp(slide, slide_mpp), replace(opts, max_patches=left), Path(path).stem)
            backend = slide.backend
        read_px = read_px or geo.grid.read_px
        for region in plan_regions(geo.grid, geo.mask, geo.block):
            tasks.append(region_task(key, str(path), backend, geo.grid, region, **({"decode": decode} if decode else {})))
        if left is not None:
            left -= int(geo.mask.sum())
            if left <= 0:
                break
    return tasks, read_px


def loader_only_readers(device, workers: int, asked: int | None, cores: int | None = None) -> tuple[int, int]:
    """(worker processes, in-process threads) for loader-only, in the kind of loader end-to-end
    uses: workers, or on a CPU device that decodes in-process its reading threads. Unasked, workers
    take every core (no encoder competes); ``asked``: ``--workers`` as given."""
    if device.type == "cpu" and workers == 0:
        return 0, reading_threads(device.type, 0)
    if asked is not None:
        return asked, 0
    return min(16, cores or cpu_cores()), 0


def _loader_only(tasks, workers: int, device, threads: int = 0, burst: int = 512) -> tuple[int, float]:
    """Read, decode and cut into uint8 batches on the device. Conversion, resize and normalization
    run on the device inside the encoder step, so they are counted in model-only. ``threads``
    (no ``workers``): in-process burst reads, the loader a CPU device uses end to end."""

    def feed():
        yield from tasks
        yield EndOfSlide(-1)

    n = 0
    t0 = time.perf_counter()
    for item in make_loader(feed(), workers=workers, pin_memory=device.type == "cuda", threads=threads, burst=burst):
        if isinstance(item, EndOfSlide):
            continue
        n += item.to_device(device).shape[0]
    _sync(device)
    release_handles()
    return n, time.perf_counter() - t0


def _decode_limit(tasks) -> float | None:
    """Patches per second that decoding their tiles alone allows on one core (each tile once);
    None when the slides have no native tile path."""
    from .tiles import TileSource, decode_seconds, tiles_under

    wanted: dict[tuple[str, int], set] = {}
    patches = 0
    for task in tasks:
        cells = wanted.setdefault((task.path, task.level), set())
        patches += len(task.offsets)
        cells.update((task.level_xy[0] + x, task.level_xy[1] + y, task.read_px) for x, y in task.offsets)
    seconds = 0.0
    for (path, level), cells in wanted.items():
        source = TileSource.open(path)
        if source is None or not source.supports(level):
            return None
        try:
            tiles = {t for x, y, size in cells for t in tiles_under(source.levels[level], x, y, size, size)}
            seconds += decode_seconds(source, level, tiles)
        finally:
            source.close()
    return patches / seconds if seconds else None


def _model_only(runner: EncoderRunner, read_px: int, batch_size: int, n_patches: int, device) -> tuple[int, float]:
    """uint8 batches of the read size already on the device: convert, resize, normalize, encode.
    (patches, seconds)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch_size, read_px, read_px, 3), dtype=torch.uint8, generator=gen).to(device)
    runner(x).cpu()  # warm-up: kernels, autotuning, lazy init
    batches = max(3, -(-n_patches // batch_size))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        runner(x).cpu()  # the pipeline copies every batch back, so this does too
    _sync(device)
    return batches * batch_size, time.perf_counter() - t0


def _naive(tasks, read_px: int, patch_px: int, mean, std, limit: int) -> float:
    """The common baseline: one openslide ``read_region`` per patch, then PIL/torchvision transforms
    on the CPU, in one process (what most patch-extraction scripts do)."""
    import openslide
    from torchvision import transforms

    steps = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if read_px != patch_px:
        steps.insert(0, transforms.Resize(patch_px))
    transform = transforms.Compose(steps)
    handles: dict = {}
    n = 0
    t0 = time.perf_counter()
    for task in tasks:
        slide = handles.get(task.path) or handles.setdefault(task.path, openslide.OpenSlide(task.path))
        ds = slide.level_downsamples[task.level]
        for ox, oy in task.offsets:
            if n >= limit:
                break
            loc = (task.location[0] + round(ox * ds), task.location[1] + round(oy * ds))
            transform(slide.read_region(loc, task.level, (read_px, read_px)).convert("RGB"))
            n += 1
    elapsed = time.perf_counter() - t0
    for h in handles.values():
        h.close()
    return n / elapsed if elapsed else 0.0


def run_bench(target: str | os.PathLike, *, model: str = "lunit-bt-rn50", weights: str = "random",
              options: EmbedOptions = EmbedOptions(), max_patches: int | None = 512,
              naive_patches: int = 128, slide_mpp: float | None = None) -> dict:
    """Measure one slide (or a directory of slides). ``max_patches`` caps the patches per phase;
    ``slide_mpp``: level-0 µm/px for slides without resolution metadata."""
    from .encoders import load_encoder

    from .cohort.discover import build_jobs

    jobs = build_jobs([Path(target)], slide_mpp=slide_mpp)  # the same discovery and ids as `wsi-embed embed`
    paths = [job.path for job in jobs]
    device = select_device(options.device)
    precision = select_precision(options.precision, device)
    workers = default_workers(device.type) if options.workers is None else options.workers
    loader_workers, loader_threads = loader_only_readers(device, workers, options.workers)
    opts = replace(options, workers=workers, qc=False)
    encoder = load_encoder(model, weights)
    runner = EncoderRunner(encoder, device, precision, compile=opts.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRss() as rss:
        tasks, read_px = _plan(paths, opts, max_patches, resolve_decode(opts.decode, device), slide_mpp)
        # warm-up on a tenth of the regions (imports, handles, allocator), as compare_loader does: the
        # figure is a rate, like the decode limit it is held to (slide opening is in end-to-end)
        _loader_only(tasks[: max(1, len(tasks) // 10)], loader_workers, device, loader_threads, 2 * opts.batch_size)
        n_loader, t_loader = _loader_only(tasks, loader_workers, device, loader_threads, 2 * opts.batch_size)
        # model-only in two halves, before and after end-to-end: a machine whose speed drifts over
        # minutes (shared VMs) then moves both figures alike, and their ratio keeps its meaning
        model = functools.partial(_model_only, runner, read_px or opts.grid.patch_px, opts.batch_size,
                                  device=device)
        before = model(n_loader // 2)
        stats = RunStats()
        with tempfile.TemporaryDirectory(prefix="wsi-embed-bench-") as out:
            per_slide_cap = max_patches if len(paths) == 1 else None
            results = list(embed_slides(jobs, out, [encoder], weights, replace(opts, max_patches=per_slide_cap),
                                        stats=stats))
        after = model(n_loader - n_loader // 2)
        model_rate = (before[0] + after[0]) / (before[1] + after[1])
        decode_limit = _decode_limit(tasks)
        naive_rate = _naive(tasks, read_px, opts.grid.patch_px, encoder.config.mean, encoder.config.std,
                            naive_patches) if naive_patches else None
    failed = [r for r in results if r.status == "failed"]
    e2e_rate = stats.patches / stats.total_s if stats.total_s else 0.0
    loader_rate = n_loader / t_loader if t_loader else 0.0
    compute_s = stats.patches / model_rate if model_rate else 0.0
    # on a CPU device the loader and the encoder take turns on the same cores: each patch costs its
    # loader time (all cores) plus its model time (all cores), so this is the best end-to-end rate
    shared_bound = (1.0 / (1.0 / loader_rate + 1.0 / model_rate)
                    if device.type == "cpu" and loader_rate and model_rate else None)
    steady = stats.steady_patches_per_s  # None for a run of one batch: no steady state to speak of
    out = {
        "target": str(target),
        "slides": len(paths),
        "slides_failed": len(failed),
        "patches": stats.patches,
        "model": encoder.config.name,
        "weights_random": encoder.weights.random,
        "device": str(device),
        "precision": precision,
        "batch_size": opts.batch_size,
        "workers": workers,
        "loader_workers": loader_workers,
        "loader_threads": loader_threads,
        "read_px": read_px,
        "input_size": encoder.config.input_size,
        "loader_patches_per_s": round(loader_rate, 2),
        "model_patches_per_s": round(model_rate, 2),
        "end_to_end_patches_per_s": round(e2e_rate, 2),
        "end_to_end_over_model": round(e2e_rate / model_rate, 3) if model_rate else None,
        "loader_wait_fraction": round(stats.loader_wait_fraction, 3),
        "time_to_first_batch_s": round(stats.first_batch_s, 3) if stats.first_batch_s is not None else None,
        "steady_patches_per_s": round(steady, 2) if steady is not None else None,
        "steady_over_model": round(steady / model_rate, 3) if model_rate and steady is not None else None,
        "busy_fraction": stats.busy(),
        "shared_cpu_bound_patches_per_s": round(shared_bound, 2) if shared_bound else None,
        "steady_over_shared_bound": round(steady / shared_bound, 3) if shared_bound and steady is not None else None,
        "main_process_decode_s": round(stats.decode_s, 3),  # tiles decoded for the device (--decode gpu)
        "decode": opts.decode,
        "decode_limit_patches_per_s": round(decode_limit, 2) if decode_limit else None,
        "loader_over_decode_limit": (round(loader_rate / (decode_limit * max(1, loader_workers or loader_threads)), 3)
                                     if decode_limit else None),
        "end_to_end_s": round(stats.total_s, 3),
        "per_slide_overhead_s": round(max(0.0, stats.total_s - compute_s) / len(paths), 4) if paths else None,
        "naive_loader_patches_per_s": round(naive_rate, 2) if naive_rate else None,
        "loader_over_naive": round(loader_rate / naive_rate, 2) if naive_rate else None,
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "machine": machine_info(device),
    }
    if failed:
        out["errors"] = [r.error for r in failed[:5]]
    return out
