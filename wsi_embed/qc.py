"""The QC picture: thumbnail, tissue contour and the embedded cells, checkable at a glance."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .grid import Grid

TISSUE_COLOUR = (0, 200, 0)
CELL_COLOUR = (20, 60, 255)
_MIN_SIDE, _MAX_SIDE = 1024, 2400


def render_qc(thumbnail: np.ndarray, tissue_mask: np.ndarray, grid: Grid, coords: np.ndarray,
              embedded: np.ndarray, *, scale_x: float, scale_y: float, title: str) -> Image.Image:
    """Embedded cells tinted and outlined in blue, the tissue contour in green, a caption on top."""
    h, w = thumbnail.shape[:2]
    zoom = min(_MAX_SIDE / max(h, w, 1), max(1.0, _MIN_SIDE / max(h, w, 1)))
    W, H = max(1, round(w * zoom)), max(1, round(h * zoom))
    base = Image.fromarray(thumbnail).resize((W, H), Image.Resampling.LANCZOS).convert("RGBA")
    sx, sy = scale_x * zoom, scale_y * zoom  # picture px per level-0 px
    overlay = np.zeros((H, W, 4), dtype=np.uint8)
    rows, cols = np.nonzero(embedded)
    if len(rows):
        # rasterize all cells at once: a 2-D difference array, summed, counts the cells over each pixel
        x0 = np.clip(np.floor(coords[rows, cols, 0] * sx).astype(int), 0, W)
        y0 = np.clip(np.floor(coords[rows, cols, 1] * sy).astype(int), 0, H)
        x1 = np.clip(np.floor((coords[rows, cols, 0] + grid.cell_size0) * sx).astype(int), 0, W)
        y1 = np.clip(np.floor((coords[rows, cols, 1] + grid.cell_size0) * sy).astype(int), 0, H)
        diff = np.zeros((H + 1, W + 1), dtype=np.int32)
        np.add.at(diff, (y0, x0), 1)
        np.add.at(diff, (y0, x1), -1)
        np.add.at(diff, (y1, x0), -1)
        np.add.at(diff, (y1, x1), 1)
        covered = diff.cumsum(0).cumsum(1)[:H, :W] > 0
        edge_x = np.zeros(W, bool)
        edge_x[np.clip(np.concatenate([x0, x1 - 1]), 0, W - 1)] = True
        edge_y = np.zeros(H, bool)
        edge_y[np.clip(np.concatenate([y0, y1 - 1]), 0, H - 1)] = True
        outline = covered & (edge_x[None, :] | edge_y[:, None])
        overlay[covered] = CELL_COLOUR + (50,)
        overlay[outline] = CELL_COLOUR + (220,)
    overlay = Image.fromarray(overlay, "RGBA")
    line = max(2, round(min(W, H) / 400))
    # the tissue contour: mask pixels (at picture size) within `line` px of the background
    from scipy import ndimage

    big = np.asarray(Image.fromarray(tissue_mask.astype(np.uint8) * 255).resize((W, H), Image.Resampling.NEAREST)) > 0
    contour = big & ~ndimage.binary_erosion(big, iterations=line, border_value=0)
    overlay = np.asarray(overlay).copy()
    overlay[contour] = TISSUE_COLOUR + (255,)
    overlay = Image.fromarray(overlay, "RGBA")
    picture = Image.alpha_composite(base, overlay).convert("RGB")
    caption_h = 28
    canvas = Image.new("RGB", (W, H + caption_h), (255, 255, 255))
    canvas.paste(picture, (0, caption_h))
    ImageDraw.Draw(canvas).text((6, 8), title, fill=(0, 0, 0))
    return canvas


def write_png_atomic(image: Image.Image, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG", compress_level=1)  # fast; the picture is for eyes, not archives
    os.replace(tmp, path)
    return path
