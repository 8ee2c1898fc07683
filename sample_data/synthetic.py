"""Synthetic pyramidal tiled TIFF slides mosaicked from the real sample slide's pixels.

Each level is its own top-level IFD (level 0, then 4x, 16x, ... smaller), tiled,
JPEG (YCbCr 4:2:0), so OpenSlide (generic-tiff) and TiffSlide both see the pyramid.
mpp is stored as XResolution/YResolution in pixels per centimeter, which both
readers turn into `openslide.mpp-x` / `tiffslide.mpp-x`.

Tiles are generated lazily and streamed to tifffile, so memory stays bounded for
100k x 100k slides. Every level is mosaicked from its own exact 4**k area
downsample of the same source crop, so levels agree with each other.

    python -m sample_data.synthetic OUT.tif --size 40000x40000 --mpp 0.5 [--box x0,y0,x1,y1 ...]
    python -m sample_data.synthetic --biopsies 200 OUTDIR
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in level-0 pixels, end-exclusive

DEFAULT_SOURCE = Path(__file__).resolve().parent / "CMU-1-Small-Region.svs"
MAX_LEVELS = 5  # source crops are multiples of 4**(MAX_LEVELS - 1) = 256 px
# Source crops (x0, y0, width, height) in the 2220x2967 sample slide; sides are
# multiples of 256 so every level's copy is an exact area downsample of level 0.
WHOLE_CROP = (86, 75, 2048, 2816)  # nearly the whole slide, its own background included
TISSUE_CROP = (736, 2048, 768, 768)  # dermis + epidermis, ~99% tissue, no large holes
GLASS = 236  # background grey level; noise is grey-only so its saturation stays 0
GLASS_NOISE = 3
_CELL_PERIOD = 64  # the per-cell orientation table repeats every 64 cells


@functools.lru_cache(maxsize=2)
def _source_levels(source: Path, crop: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    """Crop of the source slide and its 4**k area downsamples, k < MAX_LEVELS."""
    if not source.is_file():
        raise FileNotFoundError(
            f"sample slide {source} not found; run `python sample_data/fetch_sample.py` first"
        )
    with tifffile.TiffFile(source) as tif:
        image = tif.pages[0].asarray()
    x0, y0, w, h = crop
    if image.shape[0] < y0 + h or image.shape[1] < x0 + w or image.shape[2] < 3:
        raise ValueError(f"{source} is too small for crop {crop}; expected the CMU-1-Small-Region slide")
    base = image[y0 : y0 + h, x0 : x0 + w, :3].astype(np.float32)
    levels = []
    for k in range(MAX_LEVELS):
        f = 4**k
        down = base.reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
        levels.append(np.rint(down).astype(np.uint8))
    return tuple(levels)


def _orient(patch: np.ndarray, v: int) -> np.ndarray:
    """View of `patch` under one of 8 dihedral symmetries (transpose only if square).

    Flips/transposes commute with area downsampling, so level k stays consistent.
    """
    if v & 4 and patch.shape[0] == patch.shape[1]:
        patch = patch.transpose(1, 0, 2)
    if v & 1:
        patch = patch[::-1]
    if v & 2:
        patch = patch[:, ::-1]
    return patch


def _fill_mosaic(out: np.ndarray, patch: np.ndarray, table: np.ndarray, x0: int, y0: int) -> None:
    """Fill `out` with the periodic mosaic of `patch` at level coordinates (x0, y0)."""
    th, tw = out.shape[:2]
    ph, pw = patch.shape[:2]
    for cy in range(y0 // ph, (y0 + th - 1) // ph + 1):
        ys, ye = max(y0, cy * ph), min(y0 + th, (cy + 1) * ph)
        for cx in range(x0 // pw, (x0 + tw - 1) // pw + 1):
            xs, xe = max(x0, cx * pw), min(x0 + tw, (cx + 1) * pw)
            src = _orient(patch, int(table[cy % _CELL_PERIOD, cx % _CELL_PERIOD]))
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] = src[
                ys - cy * ph : ye - cy * ph, xs - cx * pw : xe - cx * pw
            ]


def _coverage(boxes: Sequence[Box], x0: int, y0: int, size: int, f: int) -> np.ndarray | None:
    """Fraction of each level pixel's f x f level-0 footprint inside the boxes (None if 0)."""
    lx0, ly0, lx1, ly1 = x0 * f, y0 * f, (x0 + size) * f, (y0 + size) * f
    cov = None
    for bx0, by0, bx1, by1 in boxes:
        if bx1 <= lx0 or bx0 >= lx1 or by1 <= ly0 or by0 >= ly1:
            continue
        xs = np.arange(lx0, lx1, f)
        ys = np.arange(ly0, ly1, f)
        fx = np.clip(np.minimum(xs + f, bx1) - np.maximum(xs, bx0), 0, f) / f
        fy = np.clip(np.minimum(ys + f, by1) - np.maximum(ys, by0), 0, f) / f
        part = np.outer(fy, fx).astype(np.float32)
        cov = part if cov is None else cov + part
    # Summing keeps abutting boxes seamless; overlaps are clipped.
    return None if cov is None else np.minimum(cov, 1.0)


def _tiles(
    shape: tuple[int, int],
    level: int,
    tile: int,
    patch: np.ndarray,
    table: np.ndarray,
    boxes: Sequence[Box] | None,
    glass: np.ndarray,
) -> Iterator[np.ndarray]:
    """Yield the level's tiles row by row; edge tiles are full size (TIFF pads them anyway)."""
    f = 4**level
    for ty, y0 in enumerate(range(0, shape[0], tile)):
        for tx, x0 in enumerate(range(0, shape[1], tile)):
            # A fresh array per tile: tifffile encodes buffered tiles in worker threads.
            out = np.empty((tile, tile, 3), np.uint8)
            cov = None if boxes is None else _coverage(boxes, x0, y0, tile, f)
            if boxes is None or (cov is not None and cov.min() == 1.0):
                _fill_mosaic(out, patch, table, x0, y0)
                yield out
                continue
            if level == 0:  # pixel noise averages out, so lower levels get flat glass
                oy, ox = (ty * 97) % tile, (tx * 61) % tile
                out[:] = glass[oy : oy + tile, ox : ox + tile, None]
            else:
                out[:] = GLASS
            if cov is not None:
                tissue = np.empty_like(out)
                _fill_mosaic(tissue, patch, table, x0, y0)
                c = cov[..., None]
                out[:] = np.rint(tissue * c + out * (1.0 - c)).astype(np.uint8)
            yield out


def _level_shapes(width: int, height: int, min_level_size: int) -> list[tuple[int, int]]:
    """(height, width) per level: ceil(size / 4**k) while the longer side >= min_level_size."""
    shapes = [(height, width)]
    while len(shapes) < MAX_LEVELS:
        f = 4 ** len(shapes)
        h, w = -(-height // f), -(-width // f)
        if max(h, w) < min_level_size or (h, w) == shapes[-1]:
            break
        shapes.append((h, w))
    return shapes


def make_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float = 0.5,
    tissue_boxes: Sequence[Box] | None = None,
    source: str | Path = DEFAULT_SOURCE,
    tile: int = 256,
    jpeg_quality: int = 85,
    write_mpp: bool = True,
    min_level_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a synthetic pyramidal tiled JPEG TIFF and return its path.

    tissue_boxes=None: the whole slide is a mosaic of the real slide (tissue and its
    own background). Otherwise tissue (a ~100% tissue crop) only inside the boxes
    and near-white glass elsewhere. Levels have downsamples 1, 4, 16, ... (exact when
    width/height are divisible by 4**k; at most MAX_LEVELS levels). `seed` varies the
    per-cell orientation of the mosaic. write_mpp=False writes no usable resolution
    (ResolutionUnit NONE), so neither reader reports an mpp.
    """
    if width < 1 or height < 1:
        raise ValueError(f"invalid slide size {width}x{height}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (JPEG 4:2:0), got {tile}")
    if write_mpp and not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    boxes: list[Box] | None = None
    if tissue_boxes is not None:
        ok = all(len(b) == 4 and b[0] < b[2] and b[1] < b[3] for b in tissue_boxes)
        if not ok:
            raise ValueError(f"tissue boxes must be (x0, y0, x1, y1) with x0 < x1, y0 < y1: {tissue_boxes}")
        boxes = [(int(b[0]), int(b[1]), int(b[2]), int(b[3])) for b in tissue_boxes]
    crop = WHOLE_CROP if boxes is None else TISSUE_CROP
    patches = _source_levels(Path(source).resolve(), crop)
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 8, size=(_CELL_PERIOD, _CELL_PERIOD), dtype=np.uint8)
    # Level-0 glass: tiles are windows into one noisy field (cheaper than fresh noise).
    noise = rng.integers(-GLASS_NOISE, GLASS_NOISE + 1, size=(2 * tile, 2 * tile))
    glass = (GLASS + noise).astype(np.uint8)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = _level_shapes(width, height, min_level_size)
    # Raw size > 4 GiB could (in principle) compress past the classic-TIFF limit.
    bigtiff = width * height * 3 > 2**32 - 2**25
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for k, shape in enumerate(shapes):
            res = {}
            if write_mpp:
                px_per_cm = 1e4 / (mpp * 4**k)
                res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(
                _tiles(shape, k, tile, patches[k], table, boxes, glass),
                shape=(*shape, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                subfiletype=1 if k else 0,  # REDUCEDIMAGE for pyramid levels
                metadata=None,
                **res,
            )
    return path


def make_biopsies(
    directory: str | Path,
    n: int,
    *,
    size: tuple[int, int] = (3000, 2000),
    mpp: float = 0.5,
    seed: int = 0,
) -> list[Path]:
    """Write n small slides `biopsy_000.tif`, ... (size = (width, height)), 1-3 tissue boxes each."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for i in range(n):
        boxes = []
        for _ in range(rng.integers(1, 4)):
            bw = int(rng.integers(max(1, width // 8), max(1, width // 2) + 1))
            bh = int(rng.integers(max(1, height // 8), max(1, height // 2) + 1))
            x0 = int(rng.integers(0, width - bw + 1))
            y0 = int(rng.integers(0, height - bh + 1))
            boxes.append((x0, y0, x0 + bw, y0 + bh))
        paths.append(
            make_slide(
                directory / f"biopsy_{i:03d}.tif",
                width=width, height=height, mpp=mpp, tissue_boxes=boxes, seed=seed + i,
            )
        )
    return paths


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def _parse_box(text: str) -> Box:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1, got {text!r}") from None
    return x0, y0, x1, y1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sample_data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output .tif (or directory with --biopsies)")
    parser.add_argument("--size", type=_parse_size, help="WIDTHxHEIGHT (biopsies: default 3000x2000)")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--no-mpp", action="store_true", help="write no resolution tags")
    parser.add_argument("--box", type=_parse_box, action="append", help="tissue box x0,y0,x1,y1 (repeatable)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--biopsies", type=int, metavar="N", help="write N small biopsy slides into OUT")
    args = parser.parse_args(argv)
    try:
        if args.biopsies is not None:
            size = args.size or (3000, 2000)
            paths = make_biopsies(args.out, args.biopsies, size=size, mpp=args.mpp, seed=args.seed)
        else:
            if args.size is None:
                parser.error("--size is required when writing one slide")
            paths = [
                make_slide(
                    args.out, width=args.size[0], height=args.size[1], mpp=args.mpp,
                    tissue_boxes=args.box, tile=args.tile, jpeg_quality=args.quality,
                    write_mpp=not args.no_mpp, seed=args.seed,
                )
            ]
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
