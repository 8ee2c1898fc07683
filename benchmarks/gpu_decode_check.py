"""Device JPEG decoding against the CPU path: pixels and speed, in one process. Prints JSON.

    python benchmarks/gpu_decode_check.py [--device auto|cpu|cuda[:N]] [--size 8000] [--max-patches 2048]
                                          [--work DIR] [--out FILE]

On a CUDA machine it compares nvJPEG (``torchvision.io.decode_jpeg(..., device="cuda")``) with the
CPU path (tiles.py: libjpeg-turbo via simplejpeg) on the sample slide (RGB-coded JPEG tiles with
JPEGTables) and a YCbCr JPEG pyramid: max and per-channel mean absolute differences of the same
cells, and whether nvJPEG honours the Adobe transform-0 marker those RGB-coded tiles need. It then
times, over the same cells of a ``size`` x ``size`` pyramid, (a) the CPU path (``read_cells_native``,
one thread, patches then copied to the device) and (b) raw tile streams + one batched decode per region
on the device + cutting on the device (``collect_raw`` + ``decode_to_device``), with (b)'s reading
share (what a loader worker does) and device share reported apart.

It runs on the CPU as well (``--device cpu``: torchvision's libjpeg-turbo stands in for nvJPEG), which
is how it is tested; GPU figures need a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sample_data.synthetic import make_slide  # noqa: E402
from wsi_embed.decode import (KINDS, SAME_COLOURS_MEAN, CpuFallback, DecodePlan, assemble, collect_raw,  # noqa: E402
                              colour_difference, decode_streams, decode_to_device, device_plan,
                              probe_streams)
from wsi_embed.loader import ReadTask, read_cells_native  # noqa: E402
from wsi_embed.tiles import TileSource, decode_jpeg_cpu  # noqa: E402

SAMPLE = ROOT / "sample_data" / "CMU-1-Small-Region.svs"


def region_tasks(source: TileSource, level: int, plan: DecodePlan, *, size: int = 224, block: int = 8,
                 shift: tuple[int, int] = (0, 0), limit: int | None = None) -> list[ReadTask]:
    """Blocks of block x block cells of ``size`` px covering the level from ``shift`` (cells past the
    right and bottom edges included, so edge and partial tiles are met)."""
    lv = source.levels[level]
    tasks, n = [], 0
    sx, sy = shift
    for by in range(sy, lv.height, size * block):
        for bx in range(sx, lv.width, size * block):
            rows = min(block, -(-(lv.height - by) // size))
            cols = min(block, -(-(lv.width - bx) // size))
            offsets = tuple((c * size, r * size) for r in range(rows) for c in range(cols))
            tasks.append(ReadTask(0, str(source.path), "tiffslide", level, (0, 0), (0, 0), offsets, size,
                                  len(tasks), (bx, by), plan))
            n += len(offsets)
            if limit is not None and n >= limit:
                return tasks
    return tasks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(path: Path, device: torch.device, levels: list[int] | None = None) -> dict:
    """Raw device decoder (no checks, no fallback) vs the CPU path over every cell of each level,
    aligned and not aligned to tiles; and what the checked pipeline path decided."""
    source = TileSource.open(path)
    forced = DecodePlan("device", device.type, frozenset(KINDS))
    checked = device_plan(device)
    out = {"path": str(path), "levels": {}}
    try:
        for level in levels if levels is not None else [i for i, lv in enumerate(source.levels) if lv]:
            worst, means, patches, decoders = 0, np.zeros(3), 0, set()
            for shift in [(0, 0), (37, 101)]:
                for task in region_tasks(source, level, forced, shift=shift):
                    cpu = read_cells_native(source, task).numpy()
                    raw = collect_raw(source, task, forced)
                    tiles = decode_streams(raw.streams(), device) if len(raw.ends) else []
                    ours = assemble(tiles, raw, device).cpu().numpy()
                    diff = colour_difference(ours, cpu)
                    worst = max(worst, diff["max"])
                    means += np.asarray(diff["mean"]) * len(cpu)
                    patches += len(cpu)
                    decoders.add(pipeline_decoder(source, task, checked, device))
            out["levels"][str(level)] = {"patches": patches, "max_abs_diff": worst,
                                         "mean_abs_diff": [round(m / max(patches, 1), 4) for m in means],
                                         "pipeline_decoder": sorted(decoders)}
    finally:
        source.close()
    return out


def pipeline_decoder(source: TileSource, task: ReadTask, plan: DecodePlan, device: torch.device) -> str:
    """What the checked pipeline path decodes this region with."""
    if not plan.on_device:
        return "cpu path (the device decoder passed no probe)"
    try:
        raw = collect_raw(source, task, plan)
    except CpuFallback as exc:
        return f"cpu path ({exc})"
    done = decode_to_device(raw, device)
    return done.decoder + (f" ({done.fallback})" if done.fallback else "")


def adobe_check(device: torch.device) -> dict:
    """Does the device decoder honour the Adobe transform-0 marker? On a synthetic RGB-coded stream
    and on a tile of the sample slide (decoded with and without the marker)."""
    result = {}
    for kind, stream in probe_streams().items():
        ours = decode_streams([torch.frombuffer(bytearray(stream), dtype=torch.uint8)], device)[0]
        result[f"probe_{kind}"] = colour_difference(ours.permute(1, 2, 0).cpu().numpy(), decode_jpeg_cpu(stream))
    if SAMPLE.exists():
        source = TileSource.open(SAMPLE)
        lv = source.levels[0]
        stream = source.jpeg_stream(0, 1, 1)
        source.close()
        reference = decode_jpeg_cpu(stream)
        ours = decode_streams([torch.frombuffer(bytearray(stream), dtype=torch.uint8)], device)[0]
        result["sample_tile_with_marker"] = colour_difference(ours.permute(1, 2, 0).cpu().numpy(), reference)
        if lv.jpeg_prefix is not None and lv.jpeg_prefix[2:4] == b"\xff\xee":  # RGB-coded: tiles.py adds APP14
            bare = stream[:2] + stream[18:]  # without the 16-byte marker: what libjpeg would take for YCbCr
            ours = decode_streams([torch.frombuffer(bytearray(bare), dtype=torch.uint8)], device)[0]
            result["sample_tile_without_marker"] = colour_difference(ours.permute(1, 2, 0).cpu().numpy(), reference)
    result["adobe_marker_honoured"] = max(result["probe_rgb"]["mean"]) <= SAME_COLOURS_MEAN and (
        "sample_tile_with_marker" not in result or max(result["sample_tile_with_marker"]["mean"]) <= SAME_COLOURS_MEAN)
    return result


def timing(path: Path, device: torch.device, max_patches: int, repeats: int) -> dict:
    source = TileSource.open(path)
    plan = DecodePlan("device", device.type, frozenset(KINDS))
    tasks = region_tasks(source, 0, plan, limit=max_patches)
    n = sum(len(t.offsets) for t in tasks)
    tiles = sum(len(collect_raw(source, t, plan).ends) for t in tasks)
    pin = device.type == "cuda"

    def cpu_path() -> None:
        for task in tasks:
            patches = read_cells_native(source, task)
            (patches.pin_memory() if pin else patches).to(device, non_blocking=True)

    def device_path(vectorized: bool | None, shares: dict) -> None:
        for task in tasks:
            t1 = time.perf_counter()
            raw = collect_raw(source, task, plan)
            t2 = time.perf_counter()
            decode_to_device(raw, device, vectorized=vectorized)
            shares["read"] = shares.get("read", 0.0) + t2 - t1
            shares["decode_cut"] = shares.get("decode_cut", 0.0) + time.perf_counter() - t2

    default = device.type == "cuda"  # assemble()'s default: one scatter and one gather on CUDA, slices on CPU
    runs = {"cpu_path": lambda s: cpu_path(), "device_path": lambda s: device_path(None, s),
            "device_path_other_assembly": lambda s: device_path(not default, s)}
    for run in runs.values():  # warm up (decoder handles, CUDA context, caching allocators)
        run({})
    sync(device)
    best: dict = {}
    for _ in range(repeats):
        for name, run in runs.items():
            shares: dict = {}
            t0 = time.perf_counter()
            run(shares)
            sync(device)
            seconds = time.perf_counter() - t0
            if seconds < best.get(name, (float("inf"),))[0]:
                best[name] = (seconds, shares)
    source.close()
    out = {"slide": str(path), "patches": n, "regions": len(tasks), "tiles": tiles, "repeats": repeats}
    for name, (seconds, shares) in best.items():
        out[f"{name}_patches_per_s"] = round(n / seconds, 1)
        for share, s in shares.items():
            out[f"{name}_{share}_s"] = round(s, 3)
    out["device_path_assembly"] = "vectorized (scatter + gather)" if default else "slices"
    out["device_path_other_assembly"] = "slices" if default else "vectorized (scatter + gather)"
    out["note"] = ("best of repeats, one thread for both paths; in a run the CPU path runs in every loader worker, "
                   "the device path's read share in the workers and its decode_cut share in the main process")
    return out


def machine(device: torch.device) -> dict:
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=8000, help="side of the timing pyramid (px)")
    parser.add_argument("--max-patches", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "wsi-embed-decode-check")
    parser.add_argument("--compare-size", type=int, default=3000, help="side of the YCbCr pyramid compared (px)")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: both paths then run on one core, and a loaded "
                             "machine does not stall OpenMP copies)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(device), "probe_kinds": sorted(device_plan(device).kinds)}
    report["adobe"] = adobe_check(device)
    if not args.skip_compare:
        side = args.compare_size
        ycbcr = args.work / f"ycbcr_{side}x{side * 13 // 15}.tif"
        if not ycbcr.exists():
            make_slide(ycbcr, width=side, height=side * 13 // 15, mpp=0.5)
        report["compare"] = [compare(p, device) for p in (SAMPLE, ycbcr) if p.exists()]
    big = args.work / f"ycbcr_{args.size}.tif"
    if not big.exists():
        make_slide(big, width=args.size, height=args.size, mpp=0.5)
    report["timing"] = timing(big, device, args.max_patches, args.repeats)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
