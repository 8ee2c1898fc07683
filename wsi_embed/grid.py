"""Grid geometry in physical units: which level to read, how many pixels, where each cell lies.

Cells are laid out in the pixel lattice of the level we read from, so a cell's level-0 coordinate
maps back to a whole level pixel and a region cut from a block equals a direct read of that cell.
"""

from __future__ import annotations

import logging
import math
from typing import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InvalidOption

log = logging.getLogger(__name__)

# A level whose mpp is within this relative tolerance of the target counts as "not coarser".
_MPP_TOLERANCE = 1e-3


MAX_TARGET_MPP = 100.0  # as for slides (wsi_embed.slide.MPP_MAX): coarser is a unit mistake, not a resolution


@dataclass(frozen=True)
class GridSpec:
    """What the user asks for: patches of ``patch_px`` pixels at ``mpp`` µm/px."""

    mpp: float = 0.5
    patch_px: int = 224
    stride_px: int | None = None  # default: patch_px (no overlap)

    def __post_init__(self) -> None:
        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise InvalidOption(f"--mpp must be a positive number of µm/px, got {self.mpp}")
        if self.mpp > MAX_TARGET_MPP:
            raise InvalidOption(f"--mpp {self.mpp:g} µm/px is coarser than {MAX_TARGET_MPP:g}: a {self.patch_px} px patch "
                                f"would span {self.mpp * self.patch_px / 1000:g} mm; give the patches' µm/px "
                                "(e.g. 0.5 for 20x, 0.25 for 40x)")
        if self.patch_px < 8:
            raise InvalidOption(f"--patch-size must be at least 8 px, got {self.patch_px}")
        if self.stride_px is not None and self.stride_px < 1:
            raise InvalidOption(f"--stride must be at least 1 px, got {self.stride_px}")

    @property
    def stride(self) -> int:
        return self.stride_px or self.patch_px


@dataclass(frozen=True)
class Grid:
    target_mpp: float
    patch_px: int
    stride_px: int
    slide_mpp: float
    level: int
    level_downsample: float
    level_mpp: float
    read_px: int  # pixels read at `level` per cell, then resized to patch_px
    stride_level_px: float
    origin_level: tuple[int, int]  # top-left of cell (0, 0) in level pixels
    rows: int
    cols: int

    @property
    def n_cells(self) -> int:
        return self.rows * self.cols

    @property
    def cell_size0(self) -> float:
        """Level-0 pixels covered by one cell."""
        return self.read_px * self.level_downsample

    @property
    def stride0(self) -> float:
        return self.stride_level_px * self.level_downsample

    def level_x(self, cols: np.ndarray) -> np.ndarray:
        return self.origin_level[0] + np.round(np.asarray(cols) * self.stride_level_px).astype(np.int64)

    def level_y(self, rows: np.ndarray) -> np.ndarray:
        return self.origin_level[1] + np.round(np.asarray(rows) * self.stride_level_px).astype(np.int64)

    def coords(self) -> np.ndarray:
        """(rows, cols, 2) int64 level-0 (x, y) of each cell's top-left corner."""
        xs = np.round(self.level_x(np.arange(self.cols)) * self.level_downsample).astype(np.int64)
        ys = np.round(self.level_y(np.arange(self.rows)) * self.level_downsample).astype(np.int64)
        out = np.empty((self.rows, self.cols, 2), dtype=np.int64)
        out[..., 0] = xs[None, :]
        out[..., 1] = ys[:, None]
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Grid":
        """The grid a store recorded (its ``grid`` attrs), the inverse of :meth:`attrs`."""
        fields = {k: attrs[k] for k in cls.__dataclass_fields__}
        fields["origin_level"] = tuple(fields["origin_level"])
        return cls(**fields)

    def attrs(self) -> dict:
        d = asdict(self)
        d["origin_level"] = list(self.origin_level)
        d.update(
            cell_size0=self.cell_size0,
            stride0=self.stride0,
            origin0=[round(self.origin_level[0] * self.level_downsample),
                     round(self.origin_level[1] * self.level_downsample)],
            coords="level-0 (x, y) of each cell's top-left corner",
        )
        return d


def cells_under(points0: np.ndarray, starts0: np.ndarray, stride0: float,
                cell0: float) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis, for level-0 positions: the cell whose centre is nearest (cells start at
    ``starts0``, ``cell0`` wide, ``stride0`` apart, so overlapping cells share their overlap at its
    middle), and whether the position lies on the grid. What pictures of a grid paint where."""
    points0 = np.asarray(points0, dtype=np.float64)
    starts0 = np.asarray(starts0, dtype=np.float64)
    index = np.searchsorted(starts0, points0 - (cell0 - stride0) / 2, side="right") - 1
    inside = (points0 >= starts0[0]) & (points0 < starts0[-1] + max(cell0, stride0))
    return np.clip(index, 0, len(starts0) - 1), inside


def choose_level(slide_mpp: float, downsamples: tuple[float, ...], target_mpp: float) -> int:
    """The coarsest level whose resolution is not coarser than the target."""
    best = 0
    for level, ds in enumerate(downsamples):
        if slide_mpp * ds <= target_mpp * (1 + _MPP_TOLERANCE) and ds >= downsamples[best]:
            best = level
    return best


def plan_grid(
    spec: GridSpec,
    *,
    slide_mpp: float,
    level_dimensions: tuple[tuple[int, int], ...],
    level_downsamples: tuple[float, ...],
    bounds: tuple[int, int, int, int] | None = None,
) -> Grid:
    level = choose_level(slide_mpp, level_downsamples, spec.mpp)
    ds = level_downsamples[level]
    level_mpp = slide_mpp * ds
    if level_mpp > spec.mpp * (1 + _MPP_TOLERANCE):
        log.warning("target %.4g µm/px is finer than the scan (%.4g µm/px); patches are upsampled",
                    spec.mpp, slide_mpp)
    scale = spec.mpp / level_mpp  # level pixels per target pixel
    read_px = max(1, int(round(spec.patch_px * scale)))
    stride_level = spec.stride * scale
    w0, h0 = level_dimensions[0]
    bx, by, bw, bh = bounds if bounds else (0, 0, w0, h0)
    lw, lh = level_dimensions[level]
    # the scanned area in level pixels, clipped to the level
    x0, y0 = int(math.ceil(bx / ds - 1e-6)), int(math.ceil(by / ds - 1e-6))
    x1, y1 = min(lw, int(math.floor((bx + bw) / ds + 1e-6))), min(lh, int(math.floor((by + bh) / ds + 1e-6)))

    def count(extent: int) -> int:
        return 0 if extent < read_px else int(math.floor((extent - read_px) / stride_level + 1e-9)) + 1

    cols, rows = count(x1 - x0), count(y1 - y0)
    # the last cell must fit after rounding its position
    while cols and x0 + round((cols - 1) * stride_level) + read_px > x1:
        cols -= 1
    while rows and y0 + round((rows - 1) * stride_level) + read_px > y1:
        rows -= 1
    return Grid(
        target_mpp=spec.mpp,
        patch_px=spec.patch_px,
        stride_px=spec.stride,
        slide_mpp=slide_mpp,
        level=level,
        level_downsample=ds,
        level_mpp=level_mpp,
        read_px=read_px,
        stride_level_px=stride_level,
        origin_level=(x0, y0),
        rows=rows,
        cols=cols,
    )


@dataclass(frozen=True)
class Region:
    """A block of cells read with one call: rows [r0, r1) x cols [c0, c1)."""

    index: int
    r0: int
    c0: int
    r1: int
    c1: int
    cells: tuple[tuple[int, int], ...]  # (row, col) of the cells to embed, row-major


def plan_regions(grid: Grid, mask: np.ndarray, block: int,
                 should_stop: Callable[[], bool] | None = None) -> list[Region]:
    """Blocks of ``block`` x ``block`` cells that hold at least one cell to embed. ``should_stop``
    is asked for each row of blocks (raising there stops a huge grid's planning at once)."""
    regions = []
    for r0 in range(0, grid.rows, block):
        if should_stop is not None:
            should_stop()
        for c0 in range(0, grid.cols, block):
            r1, c1 = min(r0 + block, grid.rows), min(c0 + block, grid.cols)
            rr, cc = np.nonzero(mask[r0:r1, c0:c1])
            if len(rr):
                cells = tuple((int(r0 + r), int(c0 + c)) for r, c in zip(rr, cc))
                regions.append(Region(len(regions), r0, c0, r1, c1, cells))
    return regions


def choose_block(grid: Grid, tile_px: int | None, *, max_bytes: int = 64 << 20, default: int = 8) -> int:
    """Cells per region side such that regions end on tile boundaries as far as possible.

    Neighbouring regions go to different loader workers, so a tile straddling a region border is
    decoded twice. With 224 px cells and 256 px tiles, 8 cells span exactly 7 tiles; with 240 px
    (Aperio) tiles, 15 cells span 14. The cost is tiles decoded per cell, summed over a row of regions.
    """
    largest = max(2, int(math.sqrt(max_bytes / (3 * grid.read_px**2))))
    if not tile_px or grid.cols == 0:
        return max(2, min(default, largest))
    span = max(grid.cols, 64)

    def cost(b: int) -> float:
        starts = grid.level_x(np.arange(0, span, b))
        ends = grid.level_x(np.minimum(np.arange(0, span, b) + b, span) - 1) + grid.read_px
        tiles = (ends - 1) // tile_px - starts // tile_px + 1
        return float(tiles.sum()) / span

    candidates = range(4, max(4, min(16, largest)) + 1)
    return min(candidates, key=lambda b: (round(cost(b), 3), abs(b - default)))
