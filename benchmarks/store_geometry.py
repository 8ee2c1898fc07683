"""Time the creation of one slide's store geometry (root attrs, mask, tissue_fraction, coords,
thumbnail, tissue_mask), with the geometry chunked like the embeddings (the layout before issue 9,
``legacy``) and in few chunks (``current``: :func:`wsi_embed.store.geometry_chunks`), alternating
in one process on the same slide's real geometry (tissue detection and grid of the slide given).

    python benchmarks/store_geometry.py benchmarks/data/slide-40k-0.5.tif [--rounds 5] [--json]

Prints wall and CPU seconds per create (median over the rounds) and the chunk files written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi_embed import store as store_mod  # noqa: E402
from wsi_embed.jobs import EmbedOptions  # noqa: E402
from wsi_embed.plan import plan_slide  # noqa: E402
from wsi_embed.slide import open_slide, resolve_mpp  # noqa: E402


def _legacy_rule(block: int, grid_shape: tuple[int, int]):
    """The layout before issue 9: grid arrays (mask, tissue_fraction, coords) in chunks of the region
    block, the thumbnail and tissue mask in 1024 px chunks."""

    def chunks(shape, itemsize, max_bytes=None):
        side = block if tuple(shape[:2]) == grid_shape else 1024
        return tuple(max(1, min(n, side)) for n in shape[:2]) + tuple(shape[2:])

    return chunks


def _files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _create(out: Path, geo, coords, rule) -> tuple[float, float, int]:
    saved = store_mod.geometry_chunks
    if rule is not None:
        store_mod.geometry_chunks = rule
    try:
        writer = store_mod.StoreWriter(out / f"s{time.perf_counter_ns()}.zarr", append=False)
        attrs = {"slide": {"path": "bench"}, "grid": {**geo.grid.attrs(), "block": geo.block}, "tissue": {}}
        w0, c0 = time.perf_counter(), time.process_time()
        writer.create(attrs=attrs, mask=geo.mask, tissue_fraction=geo.fraction, coords=coords,
                      thumbnail=geo.thumb.image, tissue_mask=geo.tissue_mask, chunk=geo.block)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        files = _files(writer.root_path)
        writer.abort()
    finally:
        store_mod.geometry_chunks = saved
    return wall, cpu, files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with open_slide(args.slide) as slide:
        geo = plan_slide(slide, resolve_mpp(slide), EmbedOptions(), args.slide.stem)
    coords = geo.grid.coords()
    legacy = _legacy_rule(geo.block, tuple(geo.mask.shape))
    samples: dict[str, list] = {"legacy": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="wsi-embed-geom-") as tmp:
        _create(Path(tmp), geo, coords, None)  # warm-up: imports, codec set-up
        for i in range(args.rounds):
            order = ("legacy", "current") if i % 2 == 0 else ("current", "legacy")
            for name in order:
                samples[name].append(_create(Path(tmp), geo, coords, legacy if name == "legacy" else None))
    out = {"slide": str(args.slide), "grid": [int(geo.grid.rows), int(geo.grid.cols)], "block": int(geo.block),
           "thumbnail": list(geo.thumb.image.shape), "rounds": args.rounds}
    for name, rows in samples.items():
        out[name] = {"wall_s": round(statistics.median(r[0] for r in rows), 4),
                     "cpu_s": round(statistics.median(r[1] for r in rows), 4), "files": rows[0][2]}
    out["cpu_speedup"] = round(out["legacy"]["cpu_s"] / max(1e-9, out["current"]["cpu_s"]), 1)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['slide']}: grid {out['grid'][0]} x {out['grid'][1]} cells, block {out['block']}, "
              f"thumbnail {out['thumbnail']}, median of {args.rounds}")
        for name in ("legacy", "current"):
            r = out[name]
            print(f"  {name:<8} {r['wall_s']:.3f} s wall, {r['cpu_s']:.3f} s CPU, {r['files']} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
