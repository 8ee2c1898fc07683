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


PLANTED_BOX = (768, 256, 2304, 1792)  # level-0 px of the planted region in a positive slide


def make_planted_cohort(directory: str | Path, n: int = 8, *, size: tuple[int, int] = (3072, 2048),
                        mpp: float = 0.5, seed: int = 0) -> list[dict]:
    """Write ``n`` small slides of real tissue, ``planted_000.tif``, ...; the odd-numbered ones carry a
    planted signal: inside :data:`PLANTED_BOX` the green and blue channels are swapped (a yellow-brown
    "stain" of the same saturation, so still tissue and not pen ink, that any encoder, random weights
    included, embeds apart). Returns one dict per slide:
    ``path``, ``slide_id``, ``label`` (1 planted, 0 not), ``patient_id`` (two slides a patient) and
    ``box`` (the planted box, or None). Material for MIL, search and embedding-map tests."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width, height = size
    x0, y0, x1, y1 = PLANTED_BOX
    if x1 > width or y1 > height:
        raise ValueError(f"size {width}x{height} does not hold the planted box {PLANTED_BOX}")
    rows = []
    for i in range(n):
        rgb = sample_rgb(width, height, origin=(600 + 37 * i, 700 + 23 * i), seed=seed + i)
        planted = i % 2 == 1
        if planted:
            rgb[y0:y1, x0:x1] = rgb[y0:y1, x0:x1][..., [0, 2, 1]]
        levels = [rgb]
        while min(levels[-1].shape[:2]) > 512 and len(levels) < MAX_LEVELS:
            levels.append(area_downsample(levels[-1], 4))
        path = write_pyramid(directory / f"planted_{i:03d}.tif", levels, mpp=mpp, compression="jpeg",
                             photometric="rgb", compressionargs={"level": 90})
        rows.append({"path": path, "slide_id": path.stem, "label": int(planted),
                     "patient_id": f"patient_{i // 2:02d}", "box": PLANTED_BOX if planted else None})
    return rows


def sample_rgb(width: int, height: int, *, origin: tuple[int, int] = (0, 0), source: str | Path = DEFAULT_SOURCE,
               seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: the real slide's pixels (tissue and its glass), mosaicked as in
    :func:`make_slide`, from ``origin`` (x, y) of the mosaic on (tissue around (850, 900)).
    Material for slides in other pixel formats (grey, 16-bit, RGBA, ...)."""
    if width < 1 or height < 1:
        raise ValueError(f"invalid size {width}x{height}")
    patch = _source_levels(Path(source).resolve(), WHOLE_CROP)[0]
    table = np.random.default_rng(seed).integers(0, 8, size=(_CELL_PERIOD, _CELL_PERIOD), dtype=np.uint8)
    out = np.empty((height, width, 3), np.uint8)
    _fill_mosaic(out, patch, table, int(origin[0]), int(origin[1]))
    return out


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (edges: over what is there), same dtype (floats stay floats,
    integers are rounded). Works for (h, w) and (h, w, s) arrays."""
    h, w = image.shape[:2]
    hh, ww = -(-h // factor), -(-w // factor)
    x = image.astype(np.float64)
    pad = [(0, hh * factor - h), (0, ww * factor - w)] + [(0, 0)] * (image.ndim - 2)
    ones = np.pad(np.ones((h, w)), pad[:2])
    x = np.pad(x, pad)
    shape = (hh, factor, ww, factor) + image.shape[2:]
    sums = x.reshape(shape).sum(axis=(1, 3))
    counts = ones.reshape(hh, factor, ww, factor).sum(axis=(1, 3))
    mean = sums / (counts if image.ndim == 2 else counts[..., None])
    return mean.astype(image.dtype) if image.dtype.kind == "f" else np.rint(mean).astype(image.dtype)


def write_pyramid(
    path: str | Path,
    levels: Sequence[np.ndarray],
    *,
    mpp: float | None = 0.5,
    tile: int = 256,
    compression: str | int | None = "zlib",
    **tiff_options,
) -> Path:
    """Write the given arrays as a pyramidal tiled TIFF that openslide (generic-tiff) and tiffslide
    both read: one top-level directory per level, REDUCEDIMAGE after the first, resolution tags
    for ``mpp`` scaled by each level's width. Any pixel format tifffile writes:
    ``tiff_options`` go to ``TiffWriter.write`` (photometric, extrasamples, colormap,
    planarconfig, compressionargs, description, extratags, ...); level arrays are (h, w) or
    (h, w, s), or (s, h, w) with ``planarconfig='separate'``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    separate = tiff_options.get("planarconfig") in ("separate", 2)
    width0 = levels[0].shape[2 if separate else 1]
    with tifffile.TiffWriter(path) as tw:
        for k, data in enumerate(levels):
            res = {}
            if mpp:
                px_per_cm = 1e4 / (mpp * width0 / data.shape[2 if separate else 1])
                res = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            options = dict(tiff_options)
            if k and "description" in options:
                options.pop("description")
            tw.write(np.ascontiguousarray(data), tile=(tile, tile), compression=compression,
                     subfiletype=1 if k else 0, metadata=None, **res, **options)
    return path


def make_bomb(
    path: str | Path,
    *,
    width: int = 10**6,
    height: int = 10**6,
    tile: int = 256,
    tables: str = "sparse",
    mpp: float = 0.5,
) -> Path:
    """Write a tiled RGB TIFF whose header claims ``width`` x ``height`` px but holds no pixels:
    a decompression-bomb-style file for testing that opening, checking and describing stay fast.

    Written by hand (one directory, uncompressed, tiles of ``tile`` px given as LONG so sizes past
    65535 can be claimed). ``tables="sparse"``: every tile is empty (offset 0) and the offset and
    byte-count tables lie in the file as holes, so a 10^6 x 10^6 px claim (15.3M tiles) is a
    122 MB file that takes a few KiB of disk where the file system supports sparse files.
    ``tables="past-eof"``: the tables are claimed past the end of a file of about 200 bytes.
    """
    import struct

    if tables not in ("sparse", "past-eof"):
        raise ValueError(f"tables must be 'sparse' or 'past-eof', got {tables!r}")
    n = -(-width // tile) * -(-height // tile)
    entries = 14
    pos = 8 + 2 + entries * 12 + 4
    bps_at, xres_at, yres_at = pos, pos + 6, pos + 14
    pos += 22
    if tables == "past-eof":
        offsets_at, counts_at, end = 1 << 31, (1 << 31) + 4 * n, pos
    else:
        offsets_at, counts_at, end = pos, pos + 4 * n, pos + 8 * n
        if end >= 1 << 32:
            raise ValueError(f"{n} tiles do not fit a classic TIFF; use larger tiles")

    def entry(tag: int, typ: int, count: int, value: int) -> bytes:
        if typ == 3 and count == 1:  # SHORT, inline
            return struct.pack("<HHIHH", tag, typ, count, value, 0)
        return struct.pack("<HHII", tag, typ, count, value)

    ifd = [entry(256, 4, 1, width), entry(257, 4, 1, height), entry(258, 3, 3, bps_at), entry(259, 3, 1, 1),
           entry(262, 3, 1, 2), entry(277, 3, 1, 3), entry(282, 5, 1, xres_at), entry(283, 5, 1, yres_at),
           entry(284, 3, 1, 1), entry(296, 3, 1, 3), entry(322, 4, 1, tile), entry(323, 4, 1, tile),
           entry(324, 4, n, offsets_at), entry(325, 4, n, counts_at)]
    assert len(ifd) == entries
    px_per_cm = round(1e4 / mpp)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"II*\x00" + struct.pack("<I", 8))
        f.write(struct.pack("<H", entries) + b"".join(ifd) + struct.pack("<I", 0))
        f.write(struct.pack("<HHH", 8, 8, 8) + struct.pack("<II", px_per_cm, 1) * 2)
        f.truncate(end)  # the tables: zeros, as holes
    return path


DICOM_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def make_dicom_slide(
    directory: str | Path,
    *,
    width: int,
    height: int,
    mpp: float = 0.5,
    tile: int = 256,
    levels: int = 2,
    names: str = "level{k}.dcm",
    series_uid: str | None = None,
    source: str | Path = DEFAULT_SOURCE,
    jpeg_quality: int = 85,
    seed: int = 0,
) -> list[Path]:
    """Write a DICOM whole-slide image series (one file per level, downsamples 1, 4, 16, ...,
    TILED_FULL, JPEG baseline frames) mosaicked from the real sample slide, as OpenSlide's DICOM
    reader opens it; return the files. ``names`` formats each file's name from the level ``k``
    (``"L{k}"`` writes files without an extension). Several series may share one directory
    (pass distinct or default ``series_uid``). Needs pydicom (and imagecodecs for JPEG)."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    patches = _source_levels(Path(source).resolve(), WHOLE_CROP)
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 8, size=(_CELL_PERIOD, _CELL_PERIOD), dtype=np.uint8)
    study, series, frame_ref = generate_uid(), series_uid or generate_uid(), generate_uid()
    paths = []
    for k, (h, w) in enumerate(_level_shapes(width, height, 1)[:levels]):
        frames = [imagecodecs.jpeg8_encode(t, level=jpeg_quality)
                  for t in _tiles((h, w), k, tile, patches[k], table, None, np.empty(0))]
        level_mpp = mpp * width / w
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = DICOM_WSI_SOP_CLASS
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        ds.SOPClassUID = DICOM_WSI_SOP_CLASS
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "SM"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_ref
        ds.InstanceNumber = k + 1
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
        ds.NumberOfFrames, ds.Rows, ds.Columns = len(frames), tile, tile
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * mpp / 1000, height * mpp / 1000
        measures = Dataset()
        measures.PixelSpacing = [level_mpp / 1000, level_mpp / 1000]  # mm, row spacing first
        shared = Dataset()
        shared.PixelMeasuresSequence = DicomSequence([measures])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        path = directory / names.format(k=k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
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
