"""Slide readers: openslide and tiffslide behind one small interface with openslide's names.

Every read returns an RGB ``uint8`` array (H, W, 3). Areas outside the level are white, the colour
of empty glass, for both backends alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import InvalidOption, MissingMpp, SlideNotFound, SlideOutOfLimits, UnreadableSlide
from .errors import UnsupportedSlide
from . import pixels as _pixels

log = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tiffslide"]
BACKENDS = ("auto", "openslide", "tiffslide")
BACKGROUND = 255


# Plausible slide resolutions, µm/px. Above MPP_MAX a "resolution" is a screen/export default
# (72 dpi = 352.8 µm/px, 96 dpi = 264.6 µm/px), not a scan: it counts as no resolution. Below MPP_MIN
# (past any optical microscope) the file is refused. --slide-mpp must lie in the same range.
MPP_MIN, MPP_MAX = 0.05, 100.0
MAX_PIXEL_ASPECT = 1.02  # x/y µm/px of real scanners agree to well under 1%
# A tile (or strip) is decoded whole for any read that touches it: larger ones are refused at open.
MAX_TILE_PX = 16384
# A tile/strip offset table this long is a damaged or crafted header (a 10^6 x 10^6 px claim with
# 256 px tiles has 15.3M entries; a real 80x slide a few million at most).
MAX_TABLE_ENTRIES = 1 << 24
# libtiff (openslide) needs ~3.5 µs per table entry at open; past this auto opens with tiffslide.
_BIG_TABLE = 1 << 20


@dataclass(frozen=True)
class MppInfo:
    mpp: float
    # "metadata": the reader's resolution (TIFF resolution tags, vendor metadata) or, for an
    # OME-TIFF whose only resolution is there, the OME-XML PhysicalSizeX/Y;
    # "objective-power": 10 / objective power; "override": --slide-mpp or the list's mpp column.
    source: str


class Slide:
    """A whole-slide image opened with one backend. Use :func:`open_slide`."""

    backend: str
    # how non-RGB8 samples become RGB8, in words (see wsi_embed.pixels); None for plain RGB
    pixel_conversion: str | None = None
    _converters: tuple = ()  # per level: None or a callable raw samples -> RGB uint8 (tiffslide)

    def __init__(self, path: Path, handle, backend: str, prefix: str):
        self.path = path
        self._handle = handle
        self.backend = backend
        self._prefix = prefix  # "openslide" or "tiffslide" property namespace

    # -- openslide-named geometry -------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(int(v) for v in self._handle.dimensions)

    @property
    def level_count(self) -> int:
        return int(self._handle.level_count)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self._handle.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._handle.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        return {str(k): v for k, v in self._handle.properties.items()}

    def _prop(self, name: str):
        value = self._handle.properties.get(f"{self._prefix}.{name}")
        return None if value in (None, "") else value

    @property
    def vendor(self) -> str | None:
        return self._prop("vendor")

    @property
    def objective_power(self) -> float | None:
        return _positive_number(self._prop("objective-power"))

    @property
    def metadata_mpp(self) -> float | None:
        """µm/px from the file's metadata when plausible (MPP_MIN..MPP_MAX), else None."""
        mpp, _ = self.file_mpp()
        return mpp if mpp is not None and MPP_MIN <= mpp <= MPP_MAX else None

    def file_mpp(self) -> tuple[float | None, str | None]:
        """(µm/px the file states, or None; why a stated value was ignored, or None).

        The reader's mpp first, then an OME-XML PhysicalSizeX/Y (readers do not report it).
        Values above MPP_MAX (a 72/96 dpi default) are skipped; values below MPP_MIN are
        returned so that :func:`resolve_mpp` can refuse them.
        """
        unusable = self._unusable_reader_mpp()
        ignored = f"its resolution metadata says {unusable!r} µm/px, not a resolution" if unusable else None
        for where, read in (("resolution metadata", self._reader_mpp), ("OME-XML", self._ome_mpp),
                            ("ImageJ calibration", self._imagej_mpp)):
            value = read()
            if value is None:
                continue
            if value > MPP_MAX:
                dpi = 25400.0 / value
                ignored = ignored or (f"its {where} says {value:.4g} µm/px ({dpi:.0f} dpi, a screen or export "
                                      "default, not a scan resolution)")
                continue
            return value, None
        return None, ignored

    def _reader_mpp(self) -> float | None:
        values = [v for v in self.reader_mpp_xy() if v is not None]
        return sum(values) / len(values) if values else None

    def reader_mpp_xy(self) -> tuple[float | None, float | None]:
        """(x, y) µm/px as the reader reports them; None for an axis it does not state."""
        values = [_positive_number(self._prop(f"mpp-{axis}")) for axis in ("x", "y")]
        return values[0], values[1]

    def _unusable_reader_mpp(self) -> str | None:
        """The reader's stated mpp when it is there but no resolution (0, NaN, text), else None."""
        stated = [self._prop(f"mpp-{axis}") for axis in ("x", "y")]
        if stated == [None, None]:  # openslide drops an Aperio MPP it cannot parse
            stated = [self._handle.properties.get("aperio.MPP")]
        bad = [v for v in stated if v is not None and _positive_number(v) is None]
        return str(bad[0]) if bad and all(_positive_number(v) is None for v in stated) else None

    def _ome_mpp(self) -> float | None:
        return ome_mpp(self._handle.properties.get("tiff.ImageDescription"))

    def _ome_mpp_xy(self) -> tuple[float | None, float | None]:
        return ome_mpp_xy(self._handle.properties.get("tiff.ImageDescription"))

    def _imagej_tags(self) -> tuple:
        props = self._handle.properties
        return props.get("tiff.ImageDescription"), props.get("tiff.XResolution"), props.get("tiff.YResolution")

    def _imagej_mpp(self) -> float | None:
        return imagej_mpp(*self._imagej_tags())

    def _imagej_mpp_xy(self) -> tuple[float | None, float | None]:
        return imagej_mpp_xy(*self._imagej_tags())

    def stated_mpp_xy(self) -> tuple[float | None, float | None]:
        """(x, y) µm/px as the file states them: the reader's, else OME-XML's, else an ImageJ calibration's."""
        for read in (self.reader_mpp_xy, self._ome_mpp_xy, self._imagej_mpp_xy):
            x, y = read()
            if x is not None or y is not None:
                return x, y
        return None, None

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """Level-0 (x, y, w, h) of the scanned area (openslide bounds where the format has them)."""
        width, height = self.dimensions
        try:
            x = int(self._prop("bounds-x") or 0)
            y = int(self._prop("bounds-y") or 0)
            w = int(self._prop("bounds-width") or width - x)
            h = int(self._prop("bounds-height") or height - y)
        except ValueError:
            return 0, 0, width, height
        return x, y, w, h

    def tile_size(self, level: int) -> tuple[int, int] | None:
        try:
            w = int(self._handle.properties[f"{self._prefix}.level[{level}].tile-width"])
            h = int(self._handle.properties[f"{self._prefix}.level[{level}].tile-height"])
        except (KeyError, TypeError, ValueError):
            return None
        return (w, h) if w > 0 and h > 0 else None

    # -- pixels ------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` level pixels whose top-left is level-0 ``location``.

        Only the part inside the level is read; the rest is white.
        """
        x0, y0 = location
        w, h = size
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = int(round(x0 / ds)), int(round(y0 / ds))
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + w, lw), min(ly + h, lh)
        inside = (cx0, cy0, cx1, cy1) == (lx, ly, lx + w, ly + h)
        if cx1 <= cx0 or cy1 <= cy0:
            return np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        loc0 = self._level0(cx0, cy0, ds)
        try:
            pixels = self._read(loc0, level, (cx1 - cx0, cy1 - cy0))
        except Exception as exc:  # backends raise assorted codec/IO errors on damaged files
            raise UnreadableSlide(
                f"{self.path}: cannot decode pixels at level {level} ({type(exc).__name__}: {exc}); "
                "the file is probably truncated or corrupt: re-copy or re-export it"
            ) from exc
        if inside:
            return pixels
        out = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = pixels
        return out

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def _level0(self, lx: int, ly: int, ds: float) -> tuple[int, int]:
        """Level-0 location of level pixel (lx, ly) as this backend maps it back."""
        return int(round(lx * ds)), int(round(ly * ds))

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _OpenSlide(Slide):
    def _read(self, location, level, size):
        rgba = np.asarray(self._handle.read_region(location, level, size))
        rgb, alpha = rgba[..., :3], rgba[..., 3]
        # openslide returns transparent pixels where nothing was scanned, and the file's own alpha
        # (un-premultiplied): both are composited on white, the colour of empty glass
        if ((alpha == 0) | (alpha == 255)).all():
            rgb = rgb.copy()
            rgb[alpha == 0] = BACKGROUND
            return rgb
        return _pixels.composite_on_white(rgb, alpha, premultiplied=False)


class _TiffSlide(Slide):
    def _level0(self, lx, ly, ds):
        # tiffslide truncates location / downsample; with downsamples like 4.0001 rounding would
        # land one level pixel early, so take the smallest level-0 coordinate at or past it
        return int(math.ceil(lx * ds - 1e-9)), int(math.ceil(ly * ds - 1e-9))

    def _read(self, location, level, size):
        arr = self._handle.read_region(location, level, size, as_array=True)
        convert = self._converters[level] if level < len(self._converters) else None
        if convert is not None:  # grey, 16-bit, float, palette, alpha, YCbCr JPEG 2000: see pixels
            return convert(arr)
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
            return np.ascontiguousarray(arr)
        raise UnsupportedSlide(  # the format check at open lets nothing else through
            f"{self.path}: level {level} has samples of shape {arr.shape[2:]} and type {arr.dtype}, "
            "not 8-bit RGB; re-export the slide as 8-bit RGB"
        )


def _open_openslide(path: Path) -> Slide:
    import openslide

    return _OpenSlide(path, openslide.OpenSlide(str(path)), "openslide", "openslide")


def _open_tiffslide(path: Path) -> Slide:
    import tiffslide

    return _TiffSlide(path, tiffslide.TiffSlide(str(path)), "tiffslide", "tiffslide")


def _openslide_knows(path: Path) -> bool:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except Exception:
        return False


# -- pixel formats, codecs and the backend that can read them (rules: wsi_embed.pixels) ---------
_OTHER = {"openslide": "tiffslide", "tiffslide": "openslide"}


def _check_pixels(path: Path, pix) -> None:
    """Refuse, at open, a TIFF whose pixels no backend turns into RGB."""
    reason = pix.unsupported if pix is not None else None
    if reason:
        raise UnsupportedSlide(
            f"{path}: unsupported pixel format: {reason}; only grey, RGB, RGBA and palette slides "
            "(8-bit, 16-bit or float) can be embedded: re-export it as an RGB TIFF"
        )


def _gap_message(path: Path, backend: str, gap: str) -> str:
    what = f"unsupported {gap} for {backend}" if gap.startswith("compression") else f"{backend} cannot read {gap}"
    other = _OTHER[backend]
    if _reads_with(path, other):
        return f"{path}: {what}; use --backend {other} (or auto), which reads it"
    return f"{path}: {what}, and {other} cannot read this file either; re-export it as an 8-bit RGB TIFF"


def _pixel_order(path: Path, backend: str, order: tuple[str, ...], pix) -> tuple[str, ...]:
    """The backends to try, given what each can decode of this TIFF (``pix``; None: unknown)."""
    if pix is None:
        return order
    gaps = {"openslide": pix.openslide_gap, "tiffslide": pix.tiffslide_gap}
    if backend != "auto":
        if gaps[backend]:
            raise UnsupportedSlide(_gap_message(path, backend, gaps[backend]))
        return order
    able = tuple(n for n in order if not gaps[n]) or tuple(n for n in _OTHER if n not in order and not gaps[n])
    if not able:
        raise UnsupportedSlide(
            f"{path}: neither backend reads this slide (openslide: {gaps['openslide']}; tiffslide: "
            f"{gaps['tiffslide']}); re-export it as an 8-bit RGB TIFF"
        )
    return able


def _attach_pixels(slide: Slide, pix) -> None:
    """Give an opened slide its per-level conversions (tiffslide) and the rule in words."""
    if slide.backend == "tiffslide":
        handle = slide._handle
        try:
            index = int(handle.properties.get("tiffslide.series-index") or 0)
        except (TypeError, ValueError):
            index = 0
        own = _pixels.pixels_of(handle.ts_tifffile, index)  # the very levels tiffslide reads
        if own is not None:
            _check_pixels(slide.path, own)
            pix = own
            slide._converters = own.converters()
    slide.pixel_conversion = pix.conversion if pix is not None else None


def _reads_with(path: Path, backend: str) -> bool:
    """Whether ``backend`` opens this file and decodes a pixel of its coarsest level: a hint to
    try the other backend is only given when it would work."""
    is_tiff = _looks_like_tiff(path)
    if backend == "tiffslide" and not is_tiff or backend == "openslide" and not _openslide_knows(path):
        return False
    pix = _pixels.inspect_tiff(path) if is_tiff else None
    gap = None if pix is None else pix.openslide_gap if backend == "openslide" else pix.tiffslide_gap
    if pix is not None and (pix.unsupported or gap):
        return False
    try:
        slide = (_open_openslide if backend == "openslide" else _open_tiffslide)(path)
    except Exception:
        return False
    try:
        _attach_pixels(slide, pix)
        slide._read((0, 0), slide.level_count - 1, (1, 1))
        return True
    except Exception:
        return False
    finally:
        try:
            slide.close()
        except Exception:
            pass


_OPENSLIDE_COMPRESSION = re.compile(r"[Uu]nsupported TIFF compression:? *(\d+)")


def _open_failure(path: Path, requested: str, errors: dict[str, Exception], is_tiff: bool) -> UnreadableSlide:
    """One line for a file no backend opened: damage, a codec, the other backend, or not a slide."""
    tried = tuple(errors)
    exc = errors[tried[0]]
    detail = f"{type(exc).__name__}: {exc}"
    untried = [n for n in _OTHER if n not in tried]
    if path.stat().st_size == 0:
        return UnreadableSlide(f"{path}: the slide file is truncated or corrupt (it is empty); "
                               "re-copy or re-export it")
    if is_tiff:
        try:
            damage = tiff_damage(path)
        except Exception as err:  # a header too broken to walk
            damage = f"{type(err).__name__}: {err}"
        if damage:
            return UnreadableSlide(f"{path}: the slide file is truncated or corrupt ({damage}); "
                                   "re-copy or re-export it")
        codec = _OPENSLIDE_COMPRESSION.search(str(errors.get("openslide", "")))
        if codec:
            gap = f"compression {codec.group(1)} ({_pixels.compression_name(int(codec.group(1)))})"
            if untried:
                return UnsupportedSlide(_gap_message(path, "openslide", gap))
            return UnsupportedSlide(f"{path}: unsupported {gap} for openslide, and tiffslide cannot read this file "
                                    f"either ({detail}); re-export it as an 8-bit RGB TIFF")
        other = next((n for n in untried if _reads_with(path, n)), None)
        if other:
            return UnsupportedSlide(f"{path}: {tried[0]} cannot read this TIFF ({detail}); use --backend {other} "
                                    "(or auto), which reads it")
        return UnreadableSlide(f"{path}: the slide file is truncated or corrupt ({detail}); "
                               "re-copy or re-export it")
    readers = "openslide or tiffslide" if requested == "auto" else requested
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"ZISRAWFILE"):
        return UnsupportedSlide(f"{path}: not a whole-slide image that {readers} can read: a Zeiss CZI file, which "
                                "neither openslide nor tiffslide reads; convert it to a pyramidal OME-TIFF first "
                                "(e.g. with bfconvert or QuPath)")
    other = next((n for n in untried if _reads_with(path, n)), None)
    tail = f"try --backend {other}" if other else "pass a slide file (.svs, .tif, .ndpi, .mrxs, ...)"
    return UnreadableSlide(f"{path}: not a whole-slide image that {readers} can read ({detail}); {tail}")


def _check_readable(path: Path) -> None:
    """UnreadableSlide for a file this process may not read (or whose disk fails), before any reader
    meets it with its own error."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError as exc:
        raise UnreadableSlide(f"{path}: cannot be read (permission denied); ask for read access to it "
                              "or copy it somewhere you can read") from exc
    except OSError as exc:
        raise UnreadableSlide(f"{path}: cannot be read ({exc.strerror or exc}); check the disk or re-copy it") from exc


def open_slide(path: str | os.PathLike, *, backend: str = "auto") -> Slide:
    """Open a slide. ``auto``: tiffslide for .svs/.tif/.tiff (fast), openslide for the rest."""
    path = Path(path)
    if backend not in BACKENDS:
        raise InvalidOption(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not path.exists():
        if path.is_symlink():
            raise SlideNotFound(f"{path}: a symbolic link to nothing (its target is missing, or the links loop); "
                                "fix the link or pass the slide file itself")
        raise SlideNotFound(f"{path}: no such file; check the path")
    if not (path.is_file() or path.is_dir()):  # reading a pipe or a device would block or never end
        raise UnreadableSlide(f"{path}: not a regular file (a pipe, socket or device); pass the slide file itself")
    if path.is_dir() and path.suffix.lower() == ".zarr":
        raise UnreadableSlide(f"{path}: is a Zarr folder (a wsi-embed store?), not a slide file; "
                              f"look inside a store with `wsi-embed inspect {path}`, or pass the slide file")
    if path.is_dir():
        from .dicom import dicom_folder_file

        path = dicom_folder_file(path)  # a folder holding one DICOM series: one of its files
    _check_readable(path)
    is_tiff = _looks_like_tiff(path)
    # tile/strip size and table length from the raw directories, before any reader parses tables
    ifds = _tiff_ifds(path) if is_tiff else []
    longest_table = _check_tiff_limits(path, ifds)
    pix = _pixels.inspect_tiff(path) if is_tiff else None  # pixel format and codecs per level
    _check_pixels(path, pix)
    if backend == "auto":
        # tiffslide decodes TIFF-family slides several times faster (no ARGB round trip);
        # openslide covers every other vendor format
        tiff_first = path.suffix.lower() in _TIFFSLIDE_FIRST and is_tiff
        order = ("tiffslide", "openslide") if tiff_first else (
            ("openslide",) if _openslide_knows(path) else ("tiffslide",))
        if longest_table > _BIG_TABLE:  # libtiff would spend minutes on the table at open
            order = ("tiffslide",)
    elif backend == "openslide" and longest_table > _BIG_TABLE:
        raise SlideOutOfLimits(f"{path}: a level has {longest_table} tiles, which openslide takes minutes to "
                               "open; use --backend tiffslide (or auto)")
    else:
        order = (backend,)
    order = _pixel_order(path, backend, order, pix)  # skip a backend that would misread the pixels
    errors: dict[str, Exception] = {}
    for name in order:
        try:
            slide = (_open_openslide if name == "openslide" else _open_tiffslide)(path)
            if slide.level_count < 1 or min(slide.dimensions) < 1:
                slide.close()
                raise ValueError("no image levels")
            break
        except Exception as exc:  # try the next backend; report why each failed
            errors[name] = exc
    else:
        raise _open_failure(path, backend, errors, is_tiff) from errors[order[0]]
    try:
        _attach_pixels(slide, pix)
        _check_level_tiles(slide)
        _check_level0_is_largest(slide, ifds)
    except BaseException:
        slide.close()
        raise
    return slide


def ensure_intact(path: str | os.PathLike) -> None:
    """Raise if a TIFF-family slide is truncated. Run once per slide before embedding (not on every
    open: loader workers reopen slides and need not parse every directory again)."""
    path = Path(path)
    if not path.is_file():  # a folder (DICOM), or a pipe that open_slide refuses: reading it would block
        return
    damage = tiff_damage(path) if _looks_like_tiff(path) else None
    if damage:
        raise UnreadableSlide(f"{path}: the slide file is truncated or corrupt ({damage}); re-copy or re-export it")


def tiff_damage(path: Path) -> str | None:
    """Why a TIFF-family file is damaged, or None: a directory, a tile table or tile data past the
    end of the file.

    An interrupted copy often keeps the first levels readable; embedding it anyway would hide the
    damage, so it is reported up front. Bounded whatever the header claims: directories are read
    entry by entry, tables of more than 2^20 tiles are sampled (4,096 entries spread over the
    table and its last 1,024) through a memory map, so a 10^6 x 10^6 px claim costs milliseconds.
    """
    path = Path(path)
    size = path.stat().st_size
    if path.suffix.lower() == ".ndpi":  # NDPI bends the TIFF offset rules (> 4 GiB); tifffile knows them
        return _ndpi_damage(path, size)
    ifds, damage = _tiff_scan(path)
    if damage:
        return damage
    for ifd in ifds:
        damage = _table_short(ifd) or _table_damage(path, ifd, size)
        if damage:
            return damage
    return None


def _table_short(ifd: _Ifd) -> str | None:
    """A tile (or strip) table with fewer entries than the image size needs: a damaged or forged
    header, whose missing tiles a reader would silently fill with black."""
    if not ifd.offsets or not ifd.width or not ifd.height:
        return None
    if ifd.tile_width and ifd.tile_height:
        need = -(-ifd.width // ifd.tile_width) * -(-ifd.height // ifd.tile_height)
        unit = f"tiles of {ifd.tile_width} x {ifd.tile_height} px"
    else:
        need = -(-ifd.height // min(ifd.rows_per_strip or ifd.height, ifd.height))
        unit = "strips"
    if ifd.offsets.count >= need:
        return None
    return (f"{ifd.name} claims {ifd.width} x {ifd.height} px, which needs {need} {unit}, but its table holds "
            f"{ifd.offsets.count}")


# -- TIFF structure, read by hand and bounded ---------------------------------------------------

_TIFF_TYPES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q",
               2: "B", 5: "Q", 7: "B", 10: "Q", 11: "f", 12: "d"}  # (5, 10: rationals, read as 8 bytes)
_MAX_IFDS = 4096
_MAX_SUBIFDS = 256
_FULL_TABLE = 1 << 20
_TABLE_SAMPLES = 1 << 12  # evenly spread, plus the last _TABLE_TAIL (a cut copy loses the tail)
_TABLE_TAIL = 1 << 10
_WIDTH, _LENGTH, _STRIP_OFFSETS, _ROWS_PER_STRIP, _STRIP_COUNTS = 256, 257, 273, 278, 279
_TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS, _SUBIFDS = 322, 323, 324, 325, 330


@dataclass(frozen=True)
class _Table:
    """A tile/strip offsets or byte-counts table: where it is, not its values."""

    dtype: str  # numpy dtype, byte order included
    count: int
    pointer: int | None  # None: the values are inline in the entry
    inline: bytes


@dataclass
class _Ifd:
    name: str  # "image 2", "image 0, sub-image 1"
    offset: int
    width: int = 0
    height: int = 0
    tile_width: int = 0
    tile_height: int = 0
    rows_per_strip: int = 0
    offsets: _Table | None = None
    bytecounts: _Table | None = None


def _tiff_scan(path: Path) -> tuple[list[_Ifd], str | None]:
    """The image directories of a TIFF (the top-level chain, then SubIFDs), read entry by entry
    without loading any table; and the first damage met (the walk stops there)."""
    import struct

    size = path.stat().st_size
    ifds: list[_Ifd] = []
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 8 or head[:4] not in _TIFF_MAGIC:
            return ifds, "no TIFF header"
        order = "<" if head[:2] == b"II" else ">"
        big = head[2:4] in (b"+\x00", b"\x00+")
        if big and len(head) < 16:
            return ifds, f"the header is cut short (file is {size} bytes)"
        cfmt, ecount, esize, ofmt = ("Q", "Q", 20, "Q") if big else ("H", "I", 12, "I")
        csize, osize = struct.calcsize(cfmt), struct.calcsize(ofmt)
        first = struct.unpack(order + ofmt, head[8:16] if big else head[4:8])[0]
        pending: list[tuple[int, str, int]] = [(first, "image ", 0)]  # chains: (offset, name prefix, first index)
        seen: set[int] = set()
        while pending:
            offset, prefix, k = pending.pop(0)
            chain: set[int] = set()
            while offset:
                if len(ifds) >= _MAX_IFDS:
                    return ifds, None
                if offset in chain:
                    return ifds, f"directory loop at byte {offset}"
                if offset in seen:  # SubIFDs may be listed and also chained to each other
                    break
                seen.add(offset)
                chain.add(offset)
                f.seek(offset)
                raw = f.read(csize)
                if len(raw) < csize:
                    return ifds, f"image directory at byte {offset} lies past the end of the file ({size} bytes)"
                n = struct.unpack(order + cfmt, raw)[0]
                if n > 65535:
                    return ifds, f"image directory at byte {offset} claims {n} entries"
                body = f.read(n * esize + osize)
                if len(body) < n * esize + osize:
                    return ifds, f"image directory at byte {offset} is cut short (file is {size} bytes)"
                ifd = _Ifd(f"{prefix}{k}", offset)
                subifds: list[int] = []
                for i in range(n):
                    e = body[i * esize:(i + 1) * esize]
                    tag, typ = struct.unpack(order + "HH", e[:4])
                    code = _TIFF_TYPES.get(typ)
                    if code is None or tag not in _SCANNED_TAGS:
                        continue
                    count = struct.unpack(order + ecount, e[4:4 + struct.calcsize(ecount)])[0]
                    field = e[4 + struct.calcsize(ecount):]
                    dtype = np.dtype(order + code)
                    inline = count * dtype.itemsize <= len(field)
                    pointer = None if inline else struct.unpack(order + ofmt, field)[0]
                    if tag in (_STRIP_OFFSETS, _TILE_OFFSETS, _STRIP_COUNTS, _TILE_COUNTS):
                        table = _Table(dtype.str, count, pointer, field if inline else b"")
                        if tag in (_STRIP_OFFSETS, _TILE_OFFSETS):
                            ifd.offsets = table
                        else:
                            ifd.bytecounts = table
                    elif tag == _SUBIFDS:
                        m = min(count, _MAX_SUBIFDS)
                        if inline:
                            data = field[:m * dtype.itemsize]
                        else:
                            if pointer + count * dtype.itemsize > size:
                                return ifds, (f"{ifd.name}: its SubIFD table at byte {pointer} lies past the end "
                                              f"of the file ({size} bytes)")
                            f.seek(pointer)
                            data = f.read(m * dtype.itemsize)
                        subifds += [int(v) for v in np.frombuffer(data, dtype) if v]
                    elif count >= 1 and inline and typ in (3, 4, 16):  # sizes: SHORT, LONG or LONG8
                        value = int(np.frombuffer(field[:dtype.itemsize], dtype)[0])
                        setattr(ifd, _SIZE_TAGS[tag], value)
                ifds.append(ifd)
                pending += [(o, f"{ifd.name}, sub-image ", j) for j, o in enumerate(subifds)]
                offset = struct.unpack(order + ofmt, body[n * esize:])[0]
                k += 1
    return ifds, None


_SIZE_TAGS = {_WIDTH: "width", _LENGTH: "height", _TILE_WIDTH: "tile_width", _TILE_LENGTH: "tile_height",
              _ROWS_PER_STRIP: "rows_per_strip"}
_SCANNED_TAGS = frozenset(_SIZE_TAGS) | {_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_OFFSETS, _TILE_COUNTS, _SUBIFDS}


def _table_values(path: Path, table: _Table, index: np.ndarray | None) -> np.ndarray:
    """A table's values (or those at ``index``) as uint64, through a memory map: only the pages
    that hold the wanted entries are read."""
    dtype = np.dtype(table.dtype)
    if table.pointer is None:
        values = np.frombuffer(table.inline[:table.count * dtype.itemsize], dtype)
    else:
        values = np.memmap(path, dtype=dtype, mode="r", offset=table.pointer, shape=(table.count,))
    picked = values if index is None else values[index]
    out = np.array(picked, dtype=np.uint64)  # a copy: the map is released with ``values``
    del values, picked
    return out


def _table_damage(path: Path, ifd: _Ifd, size: int) -> str | None:
    for what, table in (("offsets", ifd.offsets), ("byte counts", ifd.bytecounts)):
        if table is not None and table.pointer is not None and \
                table.pointer + table.count * np.dtype(table.dtype).itemsize > size:
            return (f"{ifd.name}: its table of {table.count} tile {what} at byte {table.pointer} lies past "
                    f"the end of the file ({size} bytes)")
    if ifd.offsets is None or ifd.bytecounts is None or ifd.offsets.count != ifd.bytecounts.count:
        return None  # the readers judge malformed tables
    n = ifd.offsets.count
    index = None if n <= _FULL_TABLE else np.concatenate(  # (a repeated index does no harm)
        [np.linspace(0, n - 1, _TABLE_SAMPLES).astype(np.int64), np.arange(n - _TABLE_TAIL, n)])
    offsets = _table_values(path, ifd.offsets, index)
    counts = _table_values(path, ifd.bytecounts, index)
    used = (offsets != 0) & (counts != 0)  # offset 0: an empty (sparse) tile
    offsets, counts = offsets[used], counts[used]
    # both <= size: their sum cannot overflow; either > size: the data is past the end anyway
    ends = np.where((offsets > size) | (counts > size), np.maximum(offsets, counts), offsets + counts)
    end = int(ends.max(initial=0))
    if end > size:
        return f"{ifd.name} has data past the end of the file ({end} > {size} bytes)"
    return None


def _ndpi_damage(path: Path, size: int) -> str | None:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            for i, page in enumerate(tf.pages):
                offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
                counts = np.asarray(page.databytecounts, dtype=np.uint64)
                ends = (offsets + counts)[(offsets != 0)]
                if ends.size and int(ends.max()) > size:
                    return f"image {i} has data past the end of the file ({int(ends.max())} > {size} bytes)"
    except Exception as exc:  # tifffile cannot parse what openslide opened: leave it to openslide
        log.debug("tifffile integrity check skipped for %s: %s", path, exc)
    return None


def _check_tiff_limits(path: Path, ifds: list[_Ifd]) -> int:
    """Refuse (SlideOutOfLimits) tiles or strips larger than MAX_TILE_PX square and tables longer
    than MAX_TABLE_ENTRIES; return the longest tile table."""
    longest = 0
    for ifd in ifds:
        if ifd.tile_width or ifd.tile_height:
            if max(ifd.tile_width, ifd.tile_height) > MAX_TILE_PX:
                raise SlideOutOfLimits(
                    f"{path}: {ifd.name} has {ifd.tile_width} x {ifd.tile_height} px tiles, over the "
                    f"{MAX_TILE_PX} px limit (every read decodes whole tiles); re-export it with smaller tiles "
                    "(e.g. vips tiffsave --tile --tile-width 512 --tile-height 512 --pyramid)")
        elif ifd.width and ifd.height:
            rows = min(ifd.rows_per_strip or ifd.height, ifd.height)
            if ifd.width * rows > MAX_TILE_PX * MAX_TILE_PX:
                raise SlideOutOfLimits(
                    f"{path}: {ifd.name} is stored in strips of {ifd.width} x {rows} px, more than a "
                    f"{MAX_TILE_PX} x {MAX_TILE_PX} px tile (every read decodes whole strips); re-export it as a "
                    "tiled pyramid (e.g. vips tiffsave --tile --pyramid)")
        n = ifd.offsets.count if ifd.offsets else 0
        if n > MAX_TABLE_ENTRIES:
            raise SlideOutOfLimits(
                f"{path}: {ifd.name} claims {n} tiles ({ifd.width} x {ifd.height} px), more than any scanned "
                f"slide holds (limit {MAX_TABLE_ENTRIES}); the header is damaged or the file is not a slide")
        longest = max(longest, n)
    return longest


def _tiff_ifds(path: Path) -> list[_Ifd]:
    """A TIFF's raw image directories (milliseconds, whatever the header claims). Damage is left to
    ensure_intact."""
    if path.suffix.lower() == ".ndpi":  # offsets past 4 GiB wrap; NDPI levels are JPEG strips openslide cuts
        return []
    ifds, _ = _tiff_scan(path)
    return ifds


def _check_level0_is_largest(slide: Slide, ifds: list[_Ifd]) -> None:
    """Refuse a file whose reader takes a smaller image for level 0 than one the file holds (an
    overview written first, a pyramid written smallest first): its patches would be upsampled from it."""
    w0, h0 = slide.dimensions
    # tiled images only: a stripped macro or label kept beside a small cropped export is not a slide level
    larger = [i for i in ifds if i.tile_width and i.width >= 2 * w0 and i.height >= 2 * h0]
    if larger:
        big = max(larger, key=lambda i: i.width * i.height)
        raise UnsupportedSlide(
            f"{slide.path}: the slide is read from its first image ({w0} x {h0} px), but the file holds a larger one "
            f"({big.name}, {big.width} x {big.height} px); re-export it with the full-resolution image first")


def _check_level_tiles(slide: Slide) -> None:
    """Every format, as the reader reports it: no level's tiles may exceed MAX_TILE_PX."""
    for level in range(slide.level_count):
        tile = slide.tile_size(level)
        if tile and max(tile) > MAX_TILE_PX:
            raise SlideOutOfLimits(
                f"{slide.path}: level {level} has {tile[0]} x {tile[1]} px tiles, over the {MAX_TILE_PX} px limit "
                "(every read decodes whole tiles); re-export it with smaller tiles")


_TIFFSLIDE_FIRST = (".svs", ".tif", ".tiff")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _looks_like_tiff(path: Path) -> bool:
    """SVS, NDPI, generic TIFF... all start with a TIFF header; a damaged one still does."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _positive_number(value) -> float | None:
    """A finite number > 0 from metadata text, a decimal comma accepted (``0,2527``: a scanner set to a
    comma locale), else None."""
    text = str(value).strip() if value is not None else ""
    if text.count(",") == 1 and "." not in text:
        text = text.replace(",", ".")
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def check_slide_mpp(value: float, where: str = "--slide-mpp") -> float:
    """A user-given slide resolution, checked: MPP_MIN..MPP_MAX µm/px, else InvalidOption."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise InvalidOption(f"{where} {value!r} is not a number of µm/px") from None
    if not (math.isfinite(mpp) and MPP_MIN <= mpp <= MPP_MAX):
        raise InvalidOption(f"{where} {value} is outside {MPP_MIN}-{MPP_MAX:g} µm/px; give the scan's resolution "
                            "(e.g. 0.25 for a 40x scan, 0.5 for 20x)")
    return mpp


def resolve_mpp(slide: Slide, override: float | None = None, *, warn: bool = True) -> MppInfo:
    """The user's ``--slide-mpp`` (or the list's ``mpp``) when given, else the file's metadata, else
    10 / objective power, else :class:`MissingMpp`.

    File resolutions above MPP_MAX (72/96 dpi defaults) count as none; below MPP_MIN they are
    refused (:class:`SlideOutOfLimits`) unless overridden. ``warn``: log a stated resolution that was
    passed over for the objective power (off where an earlier call for the same slide did).
    """
    if override is not None:
        return MppInfo(check_slide_mpp(override, f"{slide.path}: --slide-mpp (or the list's mpp)"), "override")
    mpp, ignored = slide.file_mpp()
    if mpp is not None:
        if mpp < MPP_MIN:
            raise SlideOutOfLimits(
                f"{slide.path}: the file says {mpp:.4g} µm/px, finer than any microscope scan "
                f"(limit {MPP_MIN}); if the metadata is wrong, pass the real resolution with --slide-mpp")
        x, y = slide.stated_mpp_xy()
        if x is not None and y is not None and max(x, y) > MAX_PIXEL_ASPECT * min(x, y):
            raise SlideOutOfLimits(
                f"{slide.path}: its pixels are not square ({x:.4g} µm/px across, {y:.4g} down), so square patches "
                "would not be square in µm; if the metadata is wrong, pass the real resolution with --slide-mpp, "
                "else resample the slide to square pixels")
        return MppInfo(mpp, "metadata")
    power = slide.objective_power
    if power is not None and MPP_MIN <= 10.0 / power <= MPP_MAX:
        if ignored and warn:
            log.warning("%s: %s; using 10 / its objective power (%gx) = %.4g µm/px (pass --slide-mpp if that is "
                        "wrong)", slide.path, ignored, power, 10.0 / power)
        return MppInfo(10.0 / power, "objective-power")
    reason = (f"{ignored}, and it has no objective power" if ignored
              else "the slide has no resolution metadata (µm/px) and no objective power")
    raise MissingMpp(f"{slide.path}: {reason}; pass its resolution with --slide-mpp "
                     "(e.g. --slide-mpp 0.25 for a 40x scan)")


_OME_UNITS_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "nm": 1e-3,
                 "Å": 1e-4, "pm": 1e-6, "mm": 1e3, "cm": 1e4, "m": 1e6, "in": 25400.0}


def imagej_mpp(description: str | bytes | None, x_resolution, y_resolution) -> float | None:
    """µm/px from an ImageJ/Fiji TIFF (the mean of x and y, see :func:`imagej_mpp_xy`)."""
    x, y = imagej_mpp_xy(description, x_resolution, y_resolution)
    return None if x is None else (x + y) / 2


def imagej_mpp_xy(description: str | bytes | None, x_resolution,
                  y_resolution) -> tuple[float | None, float | None]:
    """(x, y) µm/px from an ImageJ/Fiji TIFF: ``unit=`` in its ImageDescription (``ImageJ=...`` lines)
    and X/YResolution in pixels per that unit (no TIFF resolution unit); (None, None) when it is not one."""
    if isinstance(description, bytes):
        description = description.decode("utf-8", "replace")
    if not description or not description.startswith("ImageJ="):
        return None, None
    fields = dict(line.split("=", 1) for line in description[:4096].splitlines() if "=" in line)
    unit = fields.get("unit", "").strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    factor = _OME_UNITS_UM.get(unit) or _OME_UNITS_UM.get(unit.lower())
    values = []
    for res in (x_resolution, y_resolution):
        try:
            res = float(res)
        except (TypeError, ValueError):
            return None, None
        if not (math.isfinite(res) and res > 0):
            return None, None
        values.append(factor / res if factor else None)
    if None in values:
        return None, None
    return values[0], values[1]


def ome_mpp(description: str | bytes | None) -> float | None:
    """µm/px from an OME-XML ImageDescription: the mean of :func:`ome_mpp_xy`'s axes, or None."""
    values = [v for v in ome_mpp_xy(description) if v is not None]
    return sum(values) / len(values) if values else None


def ome_mpp_xy(description: str | bytes | None) -> tuple[float | None, float | None]:
    """(x, y) µm/px from an OME-XML ImageDescription: the first image's PhysicalSizeX/Y (units µm, nm,
    mm, ...; µm when not given). None for an axis absent, unparsable or in units that are not lengths."""
    pixels = _ome_pixels(description)
    if pixels is None:
        return None, None
    values = []
    for axis in ("X", "Y"):
        size, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        factor = _OME_UNITS_UM.get(unit.strip())
        try:
            v = float(size) * factor if size is not None and factor is not None else None
        except ValueError:
            v = None
        if v is not None and math.isfinite(v) and v > 0:
            values.append(v)
        else:
            values.append(None)
            if size is not None:
                log.debug("OME-XML PhysicalSize%s=%r %r is not a usable length", axis, size, unit)
    return values[0], values[1]


def _ome_pixels(description: str | bytes | None):
    """The first OME-XML ``Pixels`` element of an ImageDescription, or None."""
    if not description:
        return None
    if isinstance(description, bytes):
        description = description.decode("utf-8", "replace")
    head = description[:512].lstrip()
    if not (head.startswith("<?xml") or head.startswith("<OME")) or "<OME" not in description[:4096]:
        return None
    if len(description) > 64 << 20:  # an OME plate listing can be large; a bomb need not be parsed
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(description)
    except ET.ParseError as exc:
        log.debug("unparsable OME-XML: %s", exc)
        return None
    return next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)


def fingerprint(path: Path) -> str:
    """A cheap identity for a slide file: sha256 of its size and its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


@dataclass(frozen=True)
class SlideInfo:
    """What ``wsi-embed info`` prints and what the store records as ``slide`` attrs."""

    path: str
    backend: str
    vendor: str | None
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str | None
    objective_power: float | None
    file_size: int
    fingerprint: str
    # how samples that are not 8-bit RGB became RGB (grey, 16-bit, float, palette, alpha, YCbCr
    # JPEG 2000), in words; None for plain 8-bit RGB. Rules: wsi_embed.pixels
    pixel_conversion: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dimensions"] = list(self.dimensions)
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        return d


def describe(slide: Slide, mpp: MppInfo | None) -> SlideInfo:
    return SlideInfo(
        path=str(slide.path.resolve()),
        backend=slide.backend,
        vendor=slide.vendor,
        dimensions=slide.dimensions,
        level_count=slide.level_count,
        level_dimensions=slide.level_dimensions,
        level_downsamples=slide.level_downsamples,
        mpp=mpp.mpp if mpp else None,
        mpp_source=mpp.source if mpp else None,
        objective_power=slide.objective_power,
        file_size=slide.path.stat().st_size,
        fingerprint=fingerprint(slide.path),
        pixel_conversion=slide.pixel_conversion,
    )
