"""A slide's plan: geometry, tissue, the cells to embed and what its store records, worked out
before any patch is read (and before the store is touched)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from dataclasses import dataclass

import numpy as np

from . import artefacts
from .errors import SlideOutOfLimits
from .grid import Grid, Region, choose_block, plan_grid, plan_regions
from .jobs import EmbedOptions, SlideJob
from .masks import ANNOTATION_SUFFIXES, MASK_SUFFIXES, label_cells, load_annotations, load_user_mask, resolve
from .pen import INK_COLOURS, detect_ink
from .slide import MppInfo, Slide, SlideInfo, describe
from .tissue import (Thumbnail, cell_tissue_fraction, detect_tissue, is_grey, level_colour_mismatch, read_thumbnail,
                     tissue_method)

log = logging.getLogger(__name__)


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
    ink_mask: np.ndarray | None = None  # (h, w) bool, thumbnail pixels: pen marks found
    ink_fraction: np.ndarray | None = None  # (rows, cols) float32
    ink_px: dict | None = None  # colour -> ink pixels of the thumbnail
    labels: np.ndarray | None = None  # (rows, cols) int16 annotation label, -1 none
    tissue_source: dict | None = None  # method, mask_path, annotations: where the tissue came from
    excluded: dict | None = None  # reason -> tissue cells left out (ink, annotation)

    @property
    def cells(self) -> int:
        return int(self.mask.sum())

    def regions(self) -> list[Region]:
        return plan_regions(self.grid, self.mask, self.block)

    def attrs(self) -> dict:
        """The store's root attributes (JSON); :meth:`Grid.from_attrs` reads the grid back."""
        t, opts = self.thumb, self.options
        px_mm2 = t.mpp_x * t.mpp_y / 1e6
        source = self.tissue_source or {"method": tissue_method(t.image)}
        ink = self.ink_px or {}
        return {
            "slide": {**self.info.to_dict(), "slide_id": self.slide_id},
            "grid": {**self.grid.attrs(), "block": self.block},
            "tissue": {**opts.tissue.to_dict(), "min_tissue": opts.min_tissue, **source,
                       "thumbnail_mpp": [t.mpp_x, t.mpp_y], "thumbnail_scale": [t.scale_x, t.scale_y],
                       "tissue_area_mm2": float(self.tissue_mask.sum() * px_mm2),
                       "ink_area_mm2": float(self.ink_mask.sum() * px_mm2) if self.ink_mask is not None else 0.0,
                       "ink_mm2": {c: float(ink.get(c, 0) * px_mm2) for c in INK_COLOURS},
                       "cells_excluded": dict(self.excluded or {}),
                       "cells_embedded": self.cells, "max_patches": opts.max_patches},
        }

    def extra_arrays(self) -> dict:
        """The optional geometry arrays (:data:`wsi_embed.store.OPTIONAL_ARRAYS`) this plan has."""
        out = {}
        if self.ink_mask is not None:
            out["ink_mask"] = (self.ink_mask, ("y", "x"))
        if self.ink_fraction is not None:
            out["ink_fraction"] = (self.ink_fraction.astype(np.float32), ("row", "col"))
        if self.labels is not None:
            out["annotation"] = (self.labels, ("row", "col"))
        return out


def plan_slide(slide: Slide, mpp: MppInfo, opts: EmbedOptions, slide_id: str,
               cancel: threading.Event | None = None, job: SlideJob | None = None) -> SlidePlan:
    """Resolution, grid, tissue and the cells to embed. Refuses a grid over ``opts.max_cells``
    before anything that scales with the slide's claimed size.

    Tissue: the user's mask (``job.tissue_mask`` or ``opts.tissue_mask``) or detection; pen ink
    out of it (``--pen-marks remove``) and cells with more ink than ``max_ink_fraction`` left out;
    then, with annotations, only cells whose centre lies in a kept annotation."""
    info = describe(slide, mpp)
    grid = plan_grid(opts.grid, slide_mpp=mpp.mpp, level_dimensions=slide.level_dimensions,
                     level_downsamples=slide.level_downsamples, bounds=slide.bounds)
    if grid.n_cells > opts.max_cells:
        w, h = slide.dimensions
        raise SlideOutOfLimits(
            f"{slide.path}: its grid would have {grid.rows} x {grid.cols} = {grid.n_cells:,} cells ({w} x {h} px "
            f"at {mpp.mpp:g} µm/px, {mpp.source}, cells of {opts.grid.patch_px} px at --mpp {opts.grid.mpp:g}"
            f"{f', stride {opts.grid.stride_px} px' if opts.grid.stride_px else ''}), more than --max-cells "
            f"{opts.max_cells:,}; check --mpp and --stride, and the slide's resolution (override it with "
            "--slide-mpp), or raise --max-cells")
    stop = cancel.is_set if cancel is not None else None
    mask_file = resolve(job.tissue_mask if job is not None and job.tissue_mask else opts.tissue_mask,
                        slide_id, MASK_SUFFIXES, "tissue mask")
    ann_file = resolve(job.annotations if job is not None and job.annotations else opts.annotations,
                       slide_id, ANNOTATION_SUFFIXES, "annotation file")
    annotations = load_annotations(ann_file, slide.dimensions, opts.annotation_classes) if ann_file else None
    thumb = read_thumbnail(slide, mpp.mpp, opts.tissue, should_stop=stop)
    while (mismatch := level_colour_mismatch(slide, grid.level, thumb)) is not None:
        bad = grid.level  # read a finer level and downsample: never patches of wrong colours
        grid = plan_grid(opts.grid, slide_mpp=mpp.mpp, level_dimensions=slide.level_dimensions[:bad],
                         level_downsamples=slide.level_downsamples[:bad], bounds=slide.bounds)
        log.warning("%s: pyramid level %d looks miscoloured (its colours differ from level 0 by %.0f/255 at most "
                    "sampled places); the patches are read from level %d instead", slide.path, bad, mismatch,
                    grid.level)
    params = opts.tissue
    if is_grey(thumb.image):  # no colour: marker ink cannot be told from dark tissue
        ink, ink_px = np.zeros(thumb.image.shape[:2], bool), {}
    else:
        ink, ink_px = detect_ink(thumb.image, float(np.sqrt(thumb.mpp_x * thumb.mpp_y)),
                                 min_object_um2=params.ink_min_object_um2, margin_um=params.ink_margin_um)
    if mask_file is not None:
        tissue_mask = load_user_mask(mask_file, slide.dimensions, thumb.image.shape[:2])
        source = {"method": "user mask", "mask_path": str(Path(mask_file).resolve())}
    else:
        tissue_mask = detect_tissue(thumb, params, ink)
        source = {"method": tissue_method(thumb.image), "mask_path": None}
    remove = params.pen_marks == "remove"
    with_ink = None
    if remove and ink.any():  # tissue cells before the ink left the mask: those lost to it count as ink's
        with_ink = cell_tissue_fraction(tissue_mask, thumb, grid) >= opts.min_tissue
    if remove:
        tissue_mask = tissue_mask & ~ink
    fraction = cell_tissue_fraction(tissue_mask, thumb, grid)
    ink_fraction = cell_tissue_fraction(ink, thumb, grid)
    mask = fraction >= opts.min_tissue
    excluded = {}
    if remove:
        mask &= ~(ink_fraction > params.max_ink_fraction)
        excluded["ink"] = int((with_ink & ~mask).sum()) if with_ink is not None else 0
    labels = None
    source["annotations"] = None
    if annotations is not None:
        labels = label_cells(annotations, grid.coords(), grid.cell_size0)
        outside = mask & (labels < 0)
        excluded["annotation"] = int(outside.sum())
        mask &= ~outside
        source["annotations"] = annotations.attrs(opts.annotation_classes)
    if opts.max_patches is not None:  # benchmarks: keep the first N tissue cells, row-major
        keep = np.flatnonzero(mask)[: opts.max_patches]
        mask = np.zeros_like(mask)
        mask.flat[keep] = True
    tile = slide.tile_size(grid.level)
    block = opts.block or choose_block(grid, tile[0] if tile else None)
    return SlidePlan(slide_id, info, grid, thumb, tissue_mask, fraction, mask, block, opts, ink_mask=ink,
                     ink_fraction=ink_fraction, ink_px=ink_px, labels=labels, tissue_source=source,
                     excluded=excluded)


def recorded_options(tissue: dict) -> dict:
    """:class:`EmbedOptions` fields a store's ``tissue`` attrs recorded beyond the tissue params
    (the user's mask, annotations, artefact drops), so ``verify --repair`` rebuilds the same store."""
    out: dict = {}
    if tissue.get("mask_path"):
        out["tissue_mask"] = str(tissue["mask_path"])
    ann = tissue.get("annotations")
    if isinstance(ann, dict) and ann.get("path"):
        out["annotations"] = str(ann["path"])
        out["annotation_classes"] = tuple(ann["kept_classes"]) if ann.get("kept_classes") else None
    art = tissue.get("artefacts")
    if isinstance(art, dict):
        for key in artefacts.OPTION_KEYS:
            if key in art:
                out[key] = art[key]
    return out
