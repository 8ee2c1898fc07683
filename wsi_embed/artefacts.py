"""Per-cell artefact measures, taken on the pixels actually read, and the cells they drop.

Two numbers per embedded cell, from the uint8 patch as read (the read level and read size, before
any resize or normalisation), on the device with torch, beside the encoder:

- ``grey_std``: the standard deviation of the grey level (0-255, Rec. 601 luma). Glass, empty
  scanner fill and uniform smears are below ~3; tissue is above 20 (CMU-1 at 0.5 µm/px: 34 at the
  lowest). ``--drop-blank`` drops cells under ``--blank-threshold`` (default 8).
- ``laplacian_var``: the variance of the 4-neighbour Laplacian of the grey level, the usual focus
  measure. In-focus tissue at 0.5 µm/px is in the hundreds (CMU-1: 477 at the lowest); a Gaussian
  blur of 2 px brings it under 40. ``--drop-blurry`` drops cells under ``--blur-threshold``
  (default 50). It depends on the read resolution: a store records it, so filter later freely.

Both are stored as float32 (rows, cols) arrays beside ``tissue_fraction``, NaN where nothing was
read. The measures of a slide are kept on the device (no host sync per batch) and brought back
once, when its store commits (:func:`finalise`); then dropped cells leave the mask, their
embeddings become NaN and the counts follow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

BLANK_THRESHOLD = 8.0
BLUR_THRESHOLD = 50.0
MEASURES = ("grey_std", "laplacian_var")
OPTION_KEYS = ("drop_blank", "drop_blurry", "blank_threshold", "blur_threshold")  # EmbedOptions fields, store attrs


# Pixels measured at a time on a CPU: a chunk's float planes stay in cache and never need fresh pages
# (alone, 64 patches of 448 px: 2.1 -> 0.3 ms a patch on a 2-core VM; end to end at 40x about 4%)
CPU_CHUNK_PIXELS = 800_000


def patch_measures(patches):
    """(n, h, w, 3) uint8 tensor -> (n, 2) float32 tensor on the same device: grey-level std and
    variance of the Laplacian (see the module doc)."""
    import torch

    h, w = patches.shape[1:3]
    step = max(1, CPU_CHUNK_PIXELS // max(1, h * w))
    if patches.device.type == "cpu" and patches.shape[0] > step:
        return torch.cat([_measures(patches[i : i + step]) for i in range(0, patches.shape[0], step)])
    return _measures(patches)


def _measures(patches):
    import torch

    h, w = patches.shape[1:3]
    # one pass over the pixels for the grey level, then moments (no per-patch temporaries beyond one
    # Laplacian plane): on a CPU this costs a fraction of a small encoder's step, not as much again
    # each channel converted from its strided uint8 view: 3x faster than a matmul over NHWC floats
    grey = patches[..., 0].float().mul_(0.299)
    grey.add_(patches[..., 1].float(), alpha=0.587).add_(patches[..., 2].float(), alpha=0.114)
    std = _variance(grey).sqrt()
    if h >= 3 and w >= 3:
        lap = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
        lap += grey[:, 1:-1, :-2]
        lap += grey[:, 1:-1, 2:]
        lap.sub_(grey[:, 1:-1, 1:-1], alpha=4.0)
        var = _variance(lap)
    else:
        var = torch.zeros_like(std)
    return torch.stack([std, var], dim=1)


def _variance(x):
    """Per-patch variance over the last two axes, from the first two moments (float32 holds them:
    grey levels are at most 255, Laplacians at most 1,020)."""
    mean = x.mean(dim=(1, 2))
    return ((x * x).mean(dim=(1, 2)) - mean * mean).clamp_min_(0.0)


@dataclass
class Tally:
    """One slide's measures, in arrival order, still on the device."""

    rows: int
    cols: int
    taken: dict = field(default_factory=dict)  # region -> rows of it measured so far
    cells: list = field(default_factory=list)  # (n, 2) row, col arrays
    values: list = field(default_factory=list)  # (n, 2) device tensors

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: np.full((self.rows, self.cols), np.nan, np.float32) for name in MEASURES}
        if self.values:
            import torch

            values = torch.cat(self.values).float().cpu().numpy()  # one transfer per slide
            cells = np.concatenate(self.cells)
            for i, name in enumerate(MEASURES):
                out[name][cells[:, 0], cells[:, 1]] = values[:, i]
        return out


def measure(run, region: int, patches) -> None:
    """The executor's hook for each loader item: measure ``patches`` (region ``region`` of
    ``run``, in read order). Slides whose geometry already exists (a group added) are left alone."""
    if patches is None or run.writer is None or run.writer.append or run.grid is None:
        return
    tally = run.artefacts
    if tally is None:
        tally = run.artefacts = Tally(run.grid.rows, run.grid.cols)
    buf = run.regions.get(region)
    if buf is None:  # cannot happen while its rows are still arriving
        return
    start = tally.taken.get(region, 0)
    n = int(patches.shape[0])
    tally.cells.append(buf.cells[start : start + n])
    tally.values.append(patch_measures(patches))
    tally.taken[region] = start + n


def dropped(arrays: dict[str, np.ndarray], mask: np.ndarray, opts) -> dict[str, np.ndarray]:
    """Cells of ``mask`` to drop: ``blank`` and ``blurry`` (each only when asked for)."""
    out = {}
    if opts.drop_blank:
        out["blank"] = mask & (arrays["grey_std"] < opts.blank_threshold)
    if opts.drop_blurry:
        out["blurry"] = mask & (arrays["laplacian_var"] < opts.blur_threshold)
    return out


def options_attrs(opts) -> dict:
    return {"drop_blank": bool(opts.drop_blank), "drop_blurry": bool(opts.drop_blurry),
            "blank_threshold": float(opts.blank_threshold), "blur_threshold": float(opts.blur_threshold),
            "measured_on": "uint8 patch as read (read level, read size), before resize"}


def finalise(run, opts) -> None:
    """At the slide's commit (every block written): store the measures, drop blank/blurry cells
    when asked (mask, embeddings, counts) and record it in the tissue attrs. A slide whose
    geometry was reused (a group added to an existing store) is left as it is."""
    writer = run.writer
    if writer is None or writer.append:
        return
    tally = run.artefacts or Tally(run.grid.rows, run.grid.cols)
    arrays = tally.arrays()
    for name in MEASURES:
        writer.add_geometry(name, arrays[name], ("row", "col"))
    tissue = dict(writer.root_attrs()["tissue"])
    excluded = dict(tissue.get("cells_excluded") or {})
    drops = dropped(arrays, writer.read_geometry("mask"), opts)
    gone = np.zeros((run.grid.rows, run.grid.cols), bool)
    for why, cells in drops.items():
        excluded[why] = int((cells & ~gone).sum())  # a cell counts once, under the first reason
        gone |= cells
    n = int(gone.sum())
    if n:
        mask = writer.read_geometry("mask") & ~gone
        writer.update_geometry("mask", mask)
        rows, cols = np.nonzero(gone)
        for group in run.groups.values():
            _blank_cells(group, rows, cols, run.block)
        run.result.cells = int(mask.sum())
        run.qc_image = None  # drawn again from the committed store, without the dropped cells
        log.info("%s: %d cells dropped (%s)", run.job.slide_id, n,
                 ", ".join(f"{k} {v}" for k, v in excluded.items() if k in drops))
    tissue.update({"artefacts": options_attrs(opts), "cells_excluded": excluded,
                   "cells_embedded": int(run.result.cells)})
    writer.update_attrs({"tissue": tissue})


def _blank_cells(group, rows: np.ndarray, cols: np.ndarray, block: int) -> None:
    """Set the embeddings of these cells to NaN, one chunk (region block) at a time."""
    array = group.array
    keys = (rows // block) * (array.shape[1] // block + 1) + cols // block
    for key in np.unique(keys):
        pick = keys == key
        r0, c0 = int(rows[pick][0]) // block * block, int(cols[pick][0]) // block * block
        chunk = array[r0 : r0 + block, c0 : c0 + block]
        had = np.isfinite(chunk[rows[pick] - r0, cols[pick] - c0]).all(axis=-1)
        chunk[rows[pick] - r0, cols[pick] - c0] = np.nan
        array[r0 : r0 + block, c0 : c0 + block] = chunk
        group.cells_written -= int(had.sum())
