"""Slide readers: openslide and tiffslide behind one small interface with openslide's names.

Every read returns an RGB ``uint8`` array (H, W, 3). Areas outside the level are white, the colour
of empty glass, for both backends alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import MissingMpp, SlideNotFound, UnreadableSlide, InvalidOption

log = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tiffslide"]
BACKENDS = ("auto", "openslide", "tiffslide")
BACKGROUND = 255


@dataclass(frozen=True)
class MppInfo:
    mpp: float
    source: str  # "metadata" | "objective-power" | "override"


class Slide:
    """A whole-slide image opened with one backend. Use :func:`open_slide`."""

    backend: str

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
        value = self._prop("objective-power")
        try:
            power = float(value) if value is not None else None
        except ValueError:
            return None
        return power if power and power > 0 else None

    @property
    def metadata_mpp(self) -> float | None:
        values = []
        for axis in ("x", "y"):
            try:
                v = float(self._prop(f"mpp-{axis}"))
            except (TypeError, ValueError):
                continue
            if math.isfinite(v) and v > 0:
                values.append(v)
        return sum(values) / len(values) if values else None

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
        rgb = rgba[..., :3].copy()
        # openslide returns transparent (premultiplied, so black) pixels where nothing was scanned
        rgb[rgba[..., 3] == 0] = BACKGROUND
        return rgb


class _TiffSlide(Slide):
    def _level0(self, lx, ly, ds):
        # tiffslide truncates location / downsample; with downsamples like 4.0001 rounding would
        # land one level pixel early, so take the smallest level-0 coordinate at or past it
        return int(math.ceil(lx * ds - 1e-9)), int(math.ceil(ly * ds - 1e-9))

    def _read(self, location, level, size):
        arr = self._handle.read_region(location, level, size, as_array=True)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return np.ascontiguousarray(arr[..., :3]).astype(np.uint8, copy=False)


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


def open_slide(path: str | os.PathLike, *, backend: str = "auto") -> Slide:
    """Open a slide. ``auto``: tiffslide for .svs/.tif/.tiff (fast), openslide for the rest."""
    path = Path(path)
    if backend not in BACKENDS:
        raise InvalidOption(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise SlideNotFound(f"{path}: no such file; check the path")
    if path.is_dir() and path.suffix.lower() != ".zarr":
        raise UnreadableSlide(f"{path}: is a directory, not a slide file; pass the slide file itself")
    is_tiff = _looks_like_tiff(path)
    if backend == "auto":
        # tiffslide decodes TIFF-family slides several times faster (no ARGB round trip);
        # openslide covers every other vendor format
        tiff_first = path.suffix.lower() in _TIFFSLIDE_FIRST and is_tiff
        order = ("tiffslide", "openslide") if tiff_first else (
            ("openslide",) if _openslide_knows(path) else ("tiffslide",))
    else:
        order = (backend,)
    first_error = None
    for name in order:
        try:
            slide = (_open_openslide if name == "openslide" else _open_tiffslide)(path)
            if slide.level_count < 1 or min(slide.dimensions) < 1:
                slide.close()
                raise ValueError("no image levels")
            break
        except Exception as exc:  # try the next backend; report the first one's reason
            first_error = first_error or exc
    else:
        backend, exc = order[0], first_error
        detail = f"{type(exc).__name__}: {exc}"
        if is_tiff or path.stat().st_size == 0:
            raise UnreadableSlide(
                f"{path}: the slide file is truncated or corrupt ({detail}); re-copy or re-export it"
            ) from exc
        other = "tiffslide" if backend == "openslide" else "openslide"
        raise UnreadableSlide(
            f"{path}: not a whole-slide image that {backend} can read ({detail}); "
            f"pass a slide file (.svs, .tif, .ndpi, .mrxs, ...) or try --backend {other}"
        ) from exc
    return slide


def ensure_intact(path: str | os.PathLike) -> None:
    """Raise if a TIFF-family slide is truncated. Run once per slide before embedding (not on every
    open: loader workers reopen slides and need not parse every directory again)."""
    path = Path(path)
    damage = tiff_damage(path) if _looks_like_tiff(path) else None
    if damage:
        raise UnreadableSlide(f"{path}: the slide file is truncated or corrupt ({damage}); re-copy or re-export it")


def tiff_damage(path: Path) -> str | None:
    """Why a TIFF-family file is damaged, or None: a directory or tile data past the end of the file.

    An interrupted copy often keeps the first levels readable; embedding it anyway would hide the
    damage, so it is reported up front.
    """
    import struct

    size = path.stat().st_size
    if path.suffix.lower() != ".ndpi":  # NDPI bends the TIFF offset rules; tifffile handles it below
        with open(path, "rb") as f:
            head = f.read(16)
            order = "<" if head[:2] == b"II" else ">"
            big = struct.unpack(order + "H", head[2:4])[0] == 43
            count_fmt, entry, off_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
            offset = struct.unpack(order + off_fmt, head[8:16] if big else head[4:8])[0]
            seen: set[int] = set()
            while offset:
                if offset in seen:
                    return f"directory loop at byte {offset}"
                seen.add(offset)
                f.seek(offset)
                raw = f.read(struct.calcsize(count_fmt))
                if len(raw) < struct.calcsize(count_fmt):
                    return f"image directory at byte {offset} lies past the end of the file ({size} bytes)"
                n = struct.unpack(order + count_fmt, raw)[0]
                f.seek(offset + len(raw) + n * entry)
                raw = f.read(struct.calcsize(off_fmt))
                if len(raw) < struct.calcsize(off_fmt):
                    return f"image directory at byte {offset} is cut short (file is {size} bytes)"
                offset = struct.unpack(order + off_fmt, raw)[0]
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            for i, page in enumerate(tf.pages):
                ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if o]
                if ends and max(ends) > size:
                    return f"image {i} has data past the end of the file ({max(ends)} > {size} bytes)"
    except Exception as exc:  # tifffile cannot parse what openslide/tiffslide opened: leave it to them
        log.debug("tifffile integrity check skipped for %s: %s", path, exc)
    return None


_TIFFSLIDE_FIRST = (".svs", ".tif", ".tiff")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _looks_like_tiff(path: Path) -> bool:
    """SVS, NDPI, generic TIFF... all start with a TIFF header; a damaged one still does."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def resolve_mpp(slide: Slide, override: float | None = None) -> MppInfo:
    """Metadata, else 10 / objective power, else the user's ``--slide-mpp``, else an error."""
    if slide.metadata_mpp is not None:
        return MppInfo(slide.metadata_mpp, "metadata")
    if slide.objective_power is not None:
        return MppInfo(10.0 / slide.objective_power, "objective-power")
    if override is not None:
        if not (override > 0 and math.isfinite(override)):
            raise InvalidOption(f"--slide-mpp must be a positive number of µm/px, got {override}")
        return MppInfo(float(override), "override")
    raise MissingMpp(
        f"{slide.path}: the slide has no resolution metadata (µm/px) and no objective power; "
        "pass its resolution with --slide-mpp (e.g. --slide-mpp 0.25 for a 40x scan)"
    )


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
    )
