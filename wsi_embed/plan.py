"""A slide's plan: geometry, tissue, the cells to embed and what its store records, worked out
before any patch is read (and before the store is touched)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .errors import SlideOutOfLimits
from .grid import Grid, Region, choose_block, plan_grid, plan_regions
from .jobs import EmbedOptions
from .slide import MppInfo, Slide, SlideInfo, describe
from .tissue import Thumbnail, cell_tissue_fraction, detect_tissue, read_thumbnail, tissue_method


class Cancelled(BaseException):
    """The run is being interrupted: a slide being prepared stops at its next check."""


@dataclass
class SlidePlan:
    slide_id: str
    info: SlideInfo
    grid: Grid
    thumb: Thumbnail
    tissue_mask: np.ndarray  # (h, w) bool, thumbnail pixels
    fraction: np.ndarray  # (rows, cols) float32 tissue fraction of each cell
    mask: np.ndarray  # (rows, cols) bool: the cells to embed
    block: int  # cells per region side, and the embeddings' chunk side
    options: EmbedOptions

    @property
    def cells(self) -> int:
        return int(self.mask.sum())

    def regions(self) -> list[Region]:
        return plan_regions(self.grid, self.mask, self.block)

    def attrs(self) -> dict:
        """The store's root attributes (JSON); :meth:`Grid.from_attrs` reads the grid back."""
        t, opts = self.thumb, self.options
        return {
            "slide": {**self.info.to_dict(), "slide_id": self.slide_id},
            "grid": {**self.grid.attrs(), "block": self.block},
            "tissue": {**opts.tissue.to_dict(), "min_tissue": opts.min_tissue, "method": tissue_method(t.image),
                       "thumbnail_mpp": [t.mpp_x, t.mpp_y], "thumbnail_scale": [t.scale_x, t.scale_y],
                       "tissue_area_mm2": float(self.tissue_mask.sum() * t.mpp_x * t.mpp_y / 1e6),
                       "cells_embedded": self.cells, "max_patches": opts.max_patches},
        }


def plan_slide(slide: Slide, mpp: MppInfo, opts: EmbedOptions, slide_id: str,
               cancel: threading.Event | None = None) -> SlidePlan:
    """Resolution, grid, tissue and the cells to embed. Refuses a grid over ``opts.max_cells``
    before anything that scales with the slide's claimed size."""
    info = describe(slide, mpp)
    grid = plan_grid(opts.grid, slide_mpp=mpp.mpp, level_dimensions=slide.level_dimensions,
                     level_downsamples=slide.level_downsamples, bounds=slide.bounds)
    if grid.n_cells > opts.max_cells:
        w, h = slide.dimensions
        raise SlideOutOfLimits(
            f"{slide.path}: its grid would have {grid.rows} x {grid.cols} = {grid.n_cells:,} cells ({w} x {h} px "
            f"at {mpp.mpp:g} µm/px, {mpp.source}), more than --max-cells {opts.max_cells:,}; check its resolution "
            "(override it with --slide-mpp) or raise --max-cells")
    stop = cancel.is_set if cancel is not None else None
    thumb = read_thumbnail(slide, mpp.mpp, opts.tissue, should_stop=stop)
    tissue_mask = detect_tissue(thumb, opts.tissue)
    fraction = cell_tissue_fraction(tissue_mask, thumb, grid)
    mask = fraction >= opts.min_tissue
    if opts.max_patches is not None:  # benchmarks: keep the first N tissue cells, row-major
        keep = np.flatnonzero(mask)[: opts.max_patches]
        mask = np.zeros_like(mask)
        mask.flat[keep] = True
    tile = slide.tile_size(grid.level)
    block = opts.block or choose_block(grid, tile[0] if tile else None)
    return SlidePlan(slide_id, info, grid, thumb, tissue_mask, fraction, mask, block, opts)
