"""Tissue detection on a thumbnail, and each grid cell's tissue fraction."""

from __future__ import annotations

import logging
import math
from typing import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .grid import Grid
from .slide import Slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueParams:
    thumb_mpp: float = 4.0  # µm/px of the thumbnail the mask is computed on
    max_thumb_px: int = 2048  # cap on the longer side: memory stays flat for huge slides
    min_saturation: float = 0.07  # Otsu never goes below this: blank glass is not tissue
    blur_um: float = 8.0
    closing_um: float = 16.0
    min_object_um2: float = 20_000.0  # drop specks smaller than ~0.02 mm²
    max_hole_um2: float = 20_000.0  # fill holes smaller than this
    pen_marks: str = "remove"  # remove | keep: marker ink (see wsi_embed.pen) out of the tissue
    max_ink_fraction: float = 0.1  # with "remove", cells with more ink than this are not embedded
    ink_margin_um: float = 8.0  # ink grows by this (the stroke's soft edge)
    ink_min_object_um2: float = 2_000.0  # smaller ink specks are ignored

    def __post_init__(self) -> None:
        from .errors import InvalidOption
        from .pen import PEN_MODES

        if self.pen_marks not in PEN_MODES:
            raise InvalidOption(f"--pen-marks must be one of {', '.join(PEN_MODES)}, got {self.pen_marks!r}")
        if not 0.0 <= self.max_ink_fraction <= 1.0:
            raise InvalidOption(f"max_ink_fraction must be between 0 and 1, got {self.max_ink_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Thumbnail:
    image: np.ndarray  # (h, w, 3) uint8
    mpp_x: float  # level-0 µm per thumbnail pixel, per axis (sizes are rounded)
    mpp_y: float
    scale_x: float  # thumbnail px per level-0 px
    scale_y: float


def read_thumbnail(slide: Slide, slide_mpp: float, params: TissueParams,
                   should_stop: Callable[[], bool] | None = None) -> Thumbnail:
    """Downsample the whole slide block by block, so memory stays bounded for any slide size.

    A pyramid level up to twice as coarse as ``thumb_mpp`` is used as is (reading a level 16x
    larger to shrink it would cost seconds on big slides and gain nothing for tissue detection).

    Some converters write the lower pyramid levels in YCbCr (or with swapped channels) labelled
    as RGB, and a tissue mask from such a level is wrong. So the level's colours are checked
    against level 0 at a few places (:func:`_colour_mismatch`, small reads) and a finer level is
    used when they disagree. ``should_stop`` is asked between blocks: a run being interrupted
    raises :class:`~wsi_embed.plan.Cancelled` within one block read.
    """
    w0, h0 = slide.dimensions
    floor_mpp = max(params.thumb_mpp, slide_mpp, max(w0, h0) * slide_mpp / params.max_thumb_px)
    downsamples = slide.level_downsamples
    level = max((lv for lv, ds in enumerate(downsamples) if slide_mpp * ds <= 2 * floor_mpp * 1.001),
                default=0, key=lambda lv: downsamples[lv])
    while True:
        thumb = _thumbnail_from_level(slide, level, slide_mpp, floor_mpp, should_stop)
        mismatch = _colour_mismatch(slide, thumb) if downsamples[level] > 1 else None
        if mismatch is None:
            return thumb
        finer = max((lv for lv, ds in enumerate(downsamples) if ds < downsamples[level]),
                    default=0, key=lambda lv: downsamples[lv])
        log.warning("%s: pyramid level %d looks miscoloured (its colours differ from level 0 by %.0f/255 at "
                    "most sampled places: YCbCr or swapped channels labelled as RGB?); the thumbnail is read "
                    "from level %d instead", slide.path, level, mismatch, finer)
        level = finer


def _thumbnail_from_level(slide: Slide, level: int, slide_mpp: float, floor_mpp: float,
                          should_stop: Callable[[], bool] | None = None) -> Thumbnail:
    w0, h0 = slide.dimensions
    downsamples = slide.level_downsamples
    mpp = max(floor_mpp, slide_mpp * downsamples[level])
    tw, th = max(1, round(w0 * slide_mpp / mpp)), max(1, round(h0 * slide_mpp / mpp))
    lw, lh = slide.level_dimensions[level]
    fx, fy = lw / tw, lh / th  # level px per thumbnail px
    thumb = np.empty((th, tw, 3), dtype=np.uint8)
    block = max(1, int(4096 // max(fx, fy)))  # thumbnail px per block side, ~4k level px read
    ds = downsamples[level]
    for ty in range(0, th, block):
        if should_stop is not None and should_stop():
            from .plan import Cancelled

            raise Cancelled
        for tx in range(0, tw, block):
            bw, bh = min(block, tw - tx), min(block, th - ty)
            lx0, ly0 = int(round(tx * fx)), int(round(ty * fy))
            lx1, ly1 = max(lx0 + 1, int(round((tx + bw) * fx))), max(ly0 + 1, int(round((ty + bh) * fy)))
            pixels = slide.read_region((round(lx0 * ds), round(ly0 * ds)), level, (lx1 - lx0, ly1 - ly0))
            if pixels.shape[:2] != (bh, bw):
                pixels = np.asarray(Image.fromarray(pixels).resize((bw, bh), Image.Resampling.BOX))
            thumb[ty : ty + bh, tx : tx + bw] = pixels
    return Thumbnail(thumb, w0 * slide_mpp / tw, h0 * slide_mpp / th, tw / w0, th / h0)


_CHECK_GRID = 3  # places checked: the most coloured window in each cell of a 3 x 3 grid over the thumbnail
_CHECK_WINDOW = 4  # thumbnail px per window side (16 µm at 4 µm/px: a read of a few dozen level-0 px)
_CHECK_TOLERANCE = 20.0  # largest per-channel difference of mean colours, out of 255, that still agrees


def _colour_mismatch(slide: Slide, thumb: Thumbnail, level: int | None = None) -> float | None:
    """The typical colour difference between the thumbnail (or, given ``level``, that pyramid level)
    and level 0 when they disagree, else None.

    At the most coloured small window (largest max - min over R, G, B) of each cell of a 3 x 3 grid
    (stained tissue where there is any: glass alone would not show swapped channels) the thumbnail's
    mean colour is compared with the mean colour of the same area read from level 0. They disagree
    when a third or more of the places differ by more than ``_CHECK_TOLERANCE`` in some channel
    (JPEG and resampling stay far below it).
    """
    img = thumb.image
    th, tw = img.shape[:2]
    win = max(1, min(_CHECK_WINDOW, th // _CHECK_GRID, tw // _CHECK_GRID))
    high, low = channel_max_min(img)
    chroma = high.astype(np.float32) - low
    diffs = []
    for gy in range(_CHECK_GRID):
        for gx in range(_CHECK_GRID):
            y0, y1 = gy * th // _CHECK_GRID, (gy + 1) * th // _CHECK_GRID
            x0, x1 = gx * tw // _CHECK_GRID, (gx + 1) * tw // _CHECK_GRID
            if y1 - y0 < win or x1 - x0 < win:
                continue
            # summed chroma of every win x win window in the cell (integral image): take the largest
            ii = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.float64)
            ii[1:, 1:] = chroma[y0:y1, x0:x1].cumsum(0).cumsum(1)
            sums = ii[win:, win:] - ii[:-win, win:] - ii[win:, :-win] + ii[:-win, :-win]
            wy, wx = np.unravel_index(int(np.argmax(sums)), sums.shape)
            ty, tx = y0 + int(wy), x0 + int(wx)
            lx0, ly0 = int(round(tx / thumb.scale_x)), int(round(ty / thumb.scale_y))
            lx1, ly1 = int(round((tx + win) / thumb.scale_x)), int(round((ty + win) / thumb.scale_y))
            truth = slide.read_region((lx0, ly0), 0, (max(1, lx1 - lx0), max(1, ly1 - ly0)))
            if level is None:
                seen = img[ty : ty + win, tx : tx + win].reshape(-1, 3).mean(axis=0)
            else:
                ds = slide.level_downsamples[level]
                size = (max(1, round((lx1 - lx0) / ds)), max(1, round((ly1 - ly0) / ds)))
                seen = slide.read_region((lx0, ly0), level, size).reshape(-1, 3).mean(axis=0)
            diffs.append(float(np.abs(truth.reshape(-1, 3).mean(axis=0) - seen).max()))
    if not diffs:
        return None
    diffs = np.asarray(diffs)
    off = diffs > _CHECK_TOLERANCE
    return float(np.median(diffs[off])) if off.mean() >= 1 / 3 else None


def level_colour_mismatch(slide: Slide, level: int, thumb: Thumbnail) -> float | None:
    """As :func:`_colour_mismatch`, for pyramid ``level`` itself (the places are picked on ``thumb``,
    whose colours were checked): the patches of a grid read there would be miscoloured."""
    return _colour_mismatch(slide, thumb, level) if slide.level_downsamples[level] > 1 else None


def channel_max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over R, G, B (uint8): element-wise, several times faster than a
    reduction over the last axis of size 3."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def is_grey(rgb: np.ndarray) -> bool:
    """A thumbnail without colour (a grey slide repeated into RGB)."""
    if rgb.size == 0:
        return True
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # pairwise channel differences: 10-25x faster than max/min over the channel axis, and it stops at
    # the first pair that shows colour
    return all(int(np.abs(np.subtract(x, y, dtype=np.int16)).max()) <= 2 for x, y in ((r, g), (g, b), (r, b)))


def tissue_method(rgb: np.ndarray) -> str:
    return "darkness Otsu (grey slide)" if is_grey(rgb) else "saturation Otsu"


def detect_tissue(thumb: Thumbnail, params: TissueParams, ink: np.ndarray | None = None) -> np.ndarray:
    """Boolean tissue mask: saturation Otsu (darkness on grey slides), blur, closing, small objects
    and holes removed. ``ink`` pixels (pen marks) take no part in the Otsu threshold; the caller
    removes them from the mask (after the clean-up, so hole filling cannot bring them back)."""
    from skimage import filters, morphology

    if thumb.image.shape[0] < 2 or thumb.image.shape[1] < 2:
        return np.zeros(thumb.image.shape[:2], dtype=bool)
    um = math.sqrt(thumb.mpp_x * thumb.mpp_y)  # µm per thumbnail pixel
    # HSV saturation and value in float32 (rgb2hsv would make three float64 planes)
    rgb = thumb.image
    value, low = channel_max_min(rgb)  # uint8: the big planes stay one byte per pixel
    grey = is_grey(rgb)
    if grey:  # no colour to go by: tissue is what is darker than the glass
        feature = (255 - value).astype(np.float32) / 255
    else:
        feature = (value - low).astype(np.float32)
        np.divide(feature, value, out=feature, where=value > 0)
    feature = filters.gaussian(feature, sigma=max(0.5, params.blur_um / um), preserve_range=True)
    try:
        clean = feature[~ink] if ink is not None and ink.any() and not ink.all() else feature
        threshold = filters.threshold_otsu(clean)
    except ValueError:  # a constant image
        threshold = 1.0
    mask = feature > max(threshold, params.min_saturation)
    if not grey:  # very dark, unsaturated pixels (pen, out-of-scan black) are not tissue
        mask &= value > 38  # V > 0.15
    radius = max(1, round(params.closing_um / um))
    mask = morphology.closing(mask, morphology.disk(radius))
    px_area = um * um
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(params.min_object_um2 / px_area)))
    mask = morphology.remove_small_holes(mask, max_size=max(1, int(params.max_hole_um2 / px_area)))
    return mask


def cell_tissue_fraction(mask: np.ndarray, thumb: Thumbnail, grid: Grid) -> np.ndarray:
    """(rows, cols) float32: the mean of the mask over each cell's footprint."""
    if grid.n_cells == 0:
        return np.zeros((grid.rows, grid.cols), dtype=np.float32)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    coords = grid.coords()
    size = grid.cell_size0

    def span(start0: np.ndarray, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.clip(np.round(start0 * scale).astype(np.int64), 0, limit)
        b = np.clip(np.round((start0 + size) * scale).astype(np.int64), 0, limit)
        return a, np.maximum(b, np.minimum(a + 1, limit))

    x0, x1 = span(coords[0, :, 0], thumb.scale_x, mask.shape[1])
    y0, y1 = span(coords[:, 0, 1], thumb.scale_y, mask.shape[0])
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    total = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    area = np.maximum((Y1 - Y0) * (X1 - X0), 1)
    return (total / area).astype(np.float32)
