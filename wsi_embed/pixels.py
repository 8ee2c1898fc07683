"""Pixel formats and codecs: how a slide's samples become 8-bit RGB, and which formats are refused.

Every read returns RGB ``uint8``. A TIFF-family slide whose samples are anything else follows one
rule, the same for both backends, recorded as ``pixel_conversion`` in the store's ``slide`` attrs:

- **grey** (MinIsBlack) is repeated into R, G and B; MinIsWhite grey is inverted (``255 - v``) first.
- **unsigned integers** other than plain 8-bit are scaled by the largest value the file declares:
  ``round(min(v, m) * 255 / m)``, with ``m`` = the MaxSampleValue tag when present, else
  ``2**bits - 1`` (16-bit: ``m = 65535``, so 257 -> 1 and 65535 -> 255; 1-bit: 0 -> 0, 1 -> 255).
- **floats**: ``round(clip((v - lo) / (hi - lo), 0, 1) * 255)`` with ``lo, hi`` = the
  SMinSampleValue / SMaxSampleValue tags when present, else 0 and 1 (floats are taken as 0..1);
  NaN becomes 255, the white of empty glass.
- **palette** indices are looked up in the colormap; 16-bit entries are shifted down (``c >> 8``),
  a map whose entries all fit in 8 bits is used as it is (both are libtiff's rules, so openslide
  and tiffslide agree).
- **alpha** is composited on white: unassociated ``c * a / 255 + 255 - a``, premultiplied
  ``c + 255 - a``. An unspecified extra sample after RGB is ignored.
- **JPEG 2000 tiles in YCbCr**: Aperio compression 33003 and 33004 as libvips writes it hold YCbCr
  (tifffile hands the planes back as they are); they become RGB with the JFIF matrix
  (BT.601, full range), as openslide does for 33003. 33005 and 34712 decode to RGB as they are.

Refused at open (:class:`~wsi_embed.errors.UnsupportedSlide`, one line naming the file and the
format): CMYK, CIELab and other colour spaces, signed, complex or untyped samples, two samples
without alpha, more than four samples, channels stored as separate images (fluorescence).

Backends: openslide decodes through libtiff, which matches the rules above for 8-bit grey, 8- and
16-bit RGB, RGBA, MinIsWhite and 8-bit palettes. It cannot read floats, other bit depths,
MaxSampleValue scaling, 16-bit grey or grey with alpha the same way: such slides go to tiffslide.
tiffslide cannot read planar (separate) samples, YCbCr without JPEG, or a compression imagecodecs
lacks: those go to openslide. ``--backend`` naming one that cannot read the slide is refused with a
hint to the other, given only when the other really reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

# TIFF tag values
MINISWHITE, MINISBLACK, RGB, PALETTE, YCBCR = 0, 1, 2, 3, 6
UINT, INT, FLOAT, VOID, COMPLEXINT, COMPLEXFLOAT = 1, 2, 3, 4, 5, 6
UNSPECIFIED, ASSOCALPHA, UNASSALPHA = 0, 1, 2
JPEG_COMPRESSIONS = (6, 7)
YCBCR_JPEG2000 = (33003, 33004)  # Aperio YCbCr J2K; libvips writes YCbCr J2K tiles as 33004

_PHOTOMETRIC_TEXT = {
    4: "a transparency mask (PhotometricInterpretation MASK)",
    5: "CMYK (PhotometricInterpretation SEPARATED)",
    8: "CIELab colour", 9: "ICCLab colour", 10: "ITULab colour",
    32844: "LogL colour", 32845: "LogLuv colour", 32803: "raw colour-filter-array (CFA) data",
    34892: "raw LinearRaw data",
}


def compression_name(tag: int) -> str:
    try:
        import tifffile

        return tifffile.COMPRESSION(tag).name
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class LevelFormat:
    """The pixel format of one pyramid level, from its TIFF tags."""

    photometric: int
    samples: int
    bits: int
    sample_format: int
    extra: tuple[int, ...]
    compression: int
    planar: bool
    max_value: float | None = None  # MaxSampleValue / SMaxSampleValue
    min_value: float | None = None  # SMinSampleValue (floats)
    colormap: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def colour_samples(self) -> int:
        return 3 if self.photometric in (RGB, YCBCR) else 1

    @property
    def alpha(self) -> int | None:
        """ASSOCALPHA, UNASSALPHA or None: the first extra sample when it is alpha."""
        if self.samples > self.colour_samples and self.extra and self.extra[0] in (ASSOCALPHA, UNASSALPHA):
            return self.extra[0]
        return None

    @property
    def ycbcr(self) -> bool:
        """Decoded samples are YCbCr and must be converted (tifffile converts JPEG itself)."""
        return self.compression in YCBCR_JPEG2000

    @property
    def full_scale(self) -> float:
        """The sample value that maps to 255."""
        if self.sample_format == FLOAT:
            return 1.0 if self.max_value is None else self.max_value
        top = float(2**self.bits - 1)
        return self.max_value if self.max_value is not None and 0 < self.max_value <= top else top

    @property
    def plain(self) -> bool:
        """8-bit RGB, nothing to convert."""
        return (self.photometric in (RGB, YCBCR) and self.samples == 3 and self.sample_format == UINT
                and self.bits == 8 and self.full_scale == 255 and not self.ycbcr)


def level_format(page) -> LevelFormat:
    """LevelFormat of a tifffile TiffPage (or a keyframe)."""
    tags = page.tags

    def tag_value(name):
        tag = tags.get(name)
        if tag is None:
            return None
        value = tag.value
        values = [float(v) for v in (value if isinstance(value, (tuple, list, np.ndarray)) else (value,))]
        return max(values) if values else None

    fmt = int(page.sampleformat)
    max_name, min_name = ("SMaxSampleValue", "SMinSampleValue") if fmt == FLOAT else ("MaxSampleValue", None)
    colormap = page.colormap if int(page.photometric) == PALETTE else None
    bits = page.bitspersample
    if isinstance(bits, (tuple, list)):
        bits = max(bits)
    return LevelFormat(
        photometric=int(page.photometric),
        samples=int(page.samplesperpixel),
        bits=int(bits),
        sample_format=fmt,
        extra=tuple(int(e) for e in page.extrasamples),
        compression=int(page.compression),
        planar=int(page.planarconfig) == 2 and int(page.samplesperpixel) > 1,
        max_value=tag_value(max_name),
        min_value=tag_value(min_name) if min_name else None,
        colormap=None if colormap is None else np.asarray(colormap),
    )


# -- what each format needs ---------------------------------------------------------------------
def unsupported_reason(f: LevelFormat) -> str | None:
    """Why no backend can turn this level into RGB by the rules above, or None."""
    if f.photometric not in (MINISWHITE, MINISBLACK, RGB, PALETTE, YCBCR):
        text = _PHOTOMETRIC_TEXT.get(f.photometric, f"PhotometricInterpretation {f.photometric}")
        return f"{text} pixels"
    if f.sample_format in (INT,):
        return f"signed {f.bits}-bit integer samples"
    if f.sample_format in (COMPLEXINT, COMPLEXFLOAT):
        return "complex samples"
    if f.sample_format not in (UINT, FLOAT):
        return f"untyped samples (SampleFormat {f.sample_format})"
    if f.sample_format == FLOAT and f.bits not in (16, 32, 64):
        return f"{f.bits}-bit float samples"
    if f.sample_format == UINT and not 1 <= f.bits <= 32:
        return f"{f.bits}-bit samples"
    if f.sample_format == FLOAT and not f.full_scale > (f.min_value or 0.0):
        return f"float samples whose SMaxSampleValue ({f.full_scale:g}) is not above SMinSampleValue ({f.min_value:g})"
    if f.full_scale <= 0:
        return f"MaxSampleValue {f.max_value:g}"
    c = f.colour_samples
    extra = f.samples - c
    if f.photometric == PALETTE and f.samples != 1:
        return f"palette with {f.samples} samples per pixel"
    if f.photometric == PALETTE and (f.colormap is None or f.colormap.ndim != 2 or f.colormap.shape[0] != 3):
        return "palette without a usable colormap"
    if f.samples > 4:
        return f"{f.samples} samples per pixel (multi-channel)"
    if extra < 0:
        return f"{f.samples} samples per pixel for {'RGB' if c == 3 else 'grey'}"
    if c == 1 and extra == 1 and f.alpha is None:
        return "2 samples per pixel without alpha"
    if c == 1 and extra > 1:
        return f"{f.samples} samples per pixel"
    return None


def openslide_gap(f: LevelFormat) -> str | None:
    """What openslide (libtiff's RGBA conversion) would not read by the rules above, or None."""
    if f.sample_format == FLOAT:
        return f"{f.bits}-bit float samples"
    if f.bits not in (8, 16):
        return f"{f.bits}-bit samples"
    if f.photometric == PALETTE and f.bits != 8:
        return f"a {f.bits}-bit palette"
    if f.max_value is not None and f.full_scale != 2**f.bits - 1:
        return f"MaxSampleValue {f.max_value:g} (openslide scales by the full {f.bits}-bit range)"
    if f.colour_samples == 1 and f.alpha is not None:
        return "grey with alpha"
    if f.samples > f.colour_samples and f.alpha is None:
        return "an extra sample that is not alpha (libtiff takes it for alpha)"
    if f.colour_samples == 1 and f.photometric != PALETTE and f.bits == 16:
        return "16-bit grey samples exactly (libtiff maps some to wrong 8-bit values, 65535 to 0)"
    return None  # compressions openslide lacks are reported from its own error at open


def tiffslide_gap(f: LevelFormat) -> str | None:
    """What tiffslide (tifffile + imagecodecs) cannot decode, or None."""
    if f.planar:
        return "planar (separate) samples"
    if f.photometric == YCBCR and f.compression not in JPEG_COMPRESSIONS + YCBCR_JPEG2000:
        return f"YCbCr samples with compression {f.compression} ({compression_name(f.compression)})"
    try:
        import tifffile

        tifffile.TIFF.DECOMPRESSORS[f.compression]
    except Exception:
        return f"compression {f.compression} ({compression_name(f.compression)})"
    return None


def describe_conversion(f: LevelFormat) -> str | None:
    """The rule applied to this level, in words, or None for plain 8-bit RGB."""
    parts = []
    if f.ycbcr:
        parts.append(f"JPEG 2000 YCbCr tiles (compression {f.compression}) converted to RGB "
                     "(JFIF, BT.601 full range)")
    if f.photometric == PALETTE:
        depth = "8-bit entries" if _colormap_is_8bit(f.colormap) else "16-bit entries >> 8"
        parts.append(f"palette expanded through its {f.colormap.shape[1]}-entry colormap ({depth})")
    else:
        if f.sample_format == FLOAT:
            lo = 0.0 if f.min_value is None else f.min_value
            hi = f.full_scale
            tagged = (f.min_value, f.max_value) != (None, None)
            source = "SMinSampleValue/SMaxSampleValue" if tagged else "assumed 0..1"
            parts.append(f"float{f.bits} scaled to 8 bits: round(clip((v - {lo:g}) / {hi - lo:g}, 0, 1) * 255), "
                         f"NaN -> 255 ({source})")
        elif f.bits != 8 or f.full_scale != 255:
            tagged = f.max_value is not None and f.full_scale == f.max_value
            source = "MaxSampleValue" if tagged else f"{f.bits}-bit range"
            parts.append(f"{f.bits}-bit samples scaled to 8 bits: round(v * 255 / {f.full_scale:g}) ({source})")
        if f.photometric == MINISWHITE:
            parts.append("MinIsWhite inverted (255 - v)")
        if f.colour_samples == 1:
            parts.append("grey repeated into R, G, B")
    if f.alpha == UNASSALPHA:
        parts.append("alpha composited on white (c * a / 255 + 255 - a)")
    elif f.alpha == ASSOCALPHA:
        parts.append("premultiplied alpha composited on white (c + 255 - a)")
    elif f.samples > f.colour_samples:
        parts.append("unspecified extra sample ignored")
    return "; ".join(parts) or None


# -- conversion ---------------------------------------------------------------------------------
def _colormap_is_8bit(colormap: np.ndarray) -> bool:
    return int(colormap.max(initial=0)) <= 255


def _to_8bit(x: np.ndarray, f: LevelFormat) -> np.ndarray:
    """Scale samples of one kind (colour or alpha) to uint8 by the rules above."""
    if x.dtype == np.bool_:
        return x.view(np.uint8) * np.uint8(255)
    if f.sample_format == FLOAT:
        lo = 0.0 if f.min_value is None else f.min_value
        y = (x.astype(np.float32, copy=False) - np.float32(lo)) * np.float32(255.0 / (f.full_scale - lo))
        y = np.clip(y, 0, 255)
        y[np.isnan(y)] = 255
        return np.rint(y).astype(np.uint8)
    top = f.full_scale
    if x.dtype == np.uint8 and top == 255:
        return x
    work = np.float64 if x.dtype.itemsize >= 4 else np.float32
    y = np.minimum(x, x.dtype.type(min(top, np.iinfo(x.dtype).max))).astype(work) * work(255.0 / top)
    return np.rint(y).astype(np.uint8)


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """JFIF YCbCr (BT.601, full range) to RGB, uint8 in and out."""
    y = ycc[..., 0].astype(np.float32)
    cb = ycc[..., 1].astype(np.float32) - 128
    cr = ycc[..., 2].astype(np.float32) - 128
    out = np.empty(ycc.shape[:-1] + (3,), np.float32)
    out[..., 0] = y + 1.402 * cr
    out[..., 1] = y - 0.344136 * cb - 0.714136 * cr
    out[..., 2] = y + 1.772 * cb
    return np.rint(np.clip(out, 0, 255, out=out)).astype(np.uint8)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray, premultiplied: bool) -> np.ndarray:
    """uint8 RGB over white with uint8 alpha (only where alpha < 255 does anything change)."""
    if alpha.min(initial=255) == 255:
        return rgb
    a = alpha[..., None].astype(np.float32)
    c = rgb.astype(np.float32)
    out = c + (255 - a) if premultiplied else c * (a / 255) + (255 - a)
    return np.rint(np.clip(out, 0, 255, out=out)).astype(np.uint8)


class ToRGB8:
    """Callable: raw samples of one level as tiffslide returns them (h, w, s) -> RGB uint8."""

    def __init__(self, f: LevelFormat):
        self.format = f
        self._lut = None
        if f.photometric == PALETTE:
            cmap = f.colormap.astype(np.uint32)
            lut = cmap if _colormap_is_8bit(f.colormap) else cmap >> 8
            self._lut = np.ascontiguousarray(lut.T.astype(np.uint8))  # (entries, 3)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        f = self.format
        if arr.ndim == 2:
            arr = arr[..., None]
        c = f.colour_samples
        colour = arr[..., :c]
        if self._lut is not None:
            rgb = np.take(self._lut, colour[..., 0].astype(np.intp, copy=False), axis=0, mode="clip")
        else:
            v = _to_8bit(colour, f)
            if f.photometric == MINISWHITE:
                v = 255 - v
            if f.ycbcr:
                rgb = ycbcr_to_rgb(v)
            elif c == 1:
                rgb = np.repeat(v, 3, axis=2)
            else:
                rgb = v
        if f.alpha is not None and arr.shape[2] > c:
            rgb = composite_on_white(rgb, _to_8bit(arr[..., c], f), f.alpha == ASSOCALPHA)
        return np.ascontiguousarray(rgb, dtype=np.uint8)


@dataclass(frozen=True)
class TiffPixels:
    """Pixel formats of a TIFF-family slide's pyramid (its main series, as tifffile reads it)."""

    levels: tuple[LevelFormat, ...]
    axes: str
    shape: tuple[int, ...]

    @property
    def unsupported(self) -> str | None:
        if self.axes == "CYX" and self.shape[0] > 1:
            return f"{self.shape[0]} channels stored as separate images (axes CYX, e.g. a fluorescence scan)"
        return _first(unsupported_reason(f) for f in self.levels)

    @property
    def openslide_gap(self) -> str | None:
        return _first(openslide_gap(f) for f in self.levels)

    @property
    def tiffslide_gap(self) -> str | None:
        if self.axes not in ("YX", "YXS", "SYX", "CYX"):
            return f"an image stack (axes {self.axes})"
        return _first(tiffslide_gap(f) for f in self.levels)

    @property
    def conversion(self) -> str | None:
        """The rule for level 0 (and every level of the same format), in words."""
        texts = list(dict.fromkeys(describe_conversion(f) for f in self.levels))
        if len(texts) == 1:
            return texts[0]
        return "; ".join(f"level {i}: {describe_conversion(f) or 'none'}" for i, f in enumerate(self.levels))

    def converters(self) -> tuple[Callable[[np.ndarray], np.ndarray] | None, ...]:
        """Per level: None when the level is plain 8-bit RGB, else its :class:`ToRGB8`."""
        return tuple(None if f.plain else ToRGB8(f) for f in self.levels)


def _first(items):
    return next((x for x in items if x), None)


def pixels_of(tf, series_index: int = 0) -> TiffPixels | None:
    """TiffPixels of an open ``tifffile.TiffFile``; None when it has no such series."""
    try:
        series = tf.series[series_index]
        levels = tuple(level_format(lv.keyframe) for lv in series.levels)
    except Exception as exc:  # tifffile cannot describe it: leave the file to the backends
        log.debug("no pixel format for %s: %s", getattr(tf, "filename", tf), exc)
        return None
    if not levels:
        return None
    return TiffPixels(levels, str(series.axes), tuple(int(s) for s in series.shape))


def inspect_tiff(path: Path) -> TiffPixels | None:
    """TiffPixels of a TIFF-family file (parsed afresh), or None when tifffile cannot parse it."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return pixels_of(tf)
    except Exception as exc:
        log.debug("tifffile cannot parse %s: %s", path, exc)
        return None
