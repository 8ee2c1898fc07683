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
    from skimage import measure

    h, w = thumbnail.shape[:2]
    zoom = min(_MAX_SIDE / max(h, w, 1), max(1.0, _MIN_SIDE / max(h, w, 1)))
    W, H = max(1, round(w * zoom)), max(1, round(h * zoom))
    base = Image.fromarray(thumbnail).resize((W, H), Image.Resampling.LANCZOS).convert("RGBA")
    overlay = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    sx, sy = scale_x * zoom, scale_y * zoom  # picture px per level-0 px
    size = grid.cell_size0
    for r, c in zip(*np.nonzero(embedded)):
        x, y = coords[r, c]
        box = (x * sx, y * sy, (x + size) * sx - 1, (y + size) * sy - 1)
        draw.rectangle(box, fill=CELL_COLOUR + (50,), outline=CELL_COLOUR + (220,), width=1)
    line = max(2, round(min(W, H) / 400))
    padded = np.pad(tissue_mask.astype(np.uint8), 1)
    for contour in measure.find_contours(padded, 0.5):
        pts = [((p[1] - 1 + 0.5) * zoom, (p[0] - 1 + 0.5) * zoom) for p in contour]
        if len(pts) > 1:
            draw.line(pts, fill=TISSUE_COLOUR + (255,), width=line)
    picture = Image.alpha_composite(base, overlay).convert("RGB")
    caption_h = 28
    canvas = Image.new("RGB", (W, H + caption_h), (255, 255, 255))
    canvas.paste(picture, (0, caption_h))
    ImageDraw.Draw(canvas).text((6, 8), title, fill=(0, 0, 0))
    return canvas


def write_png_atomic(image: Image.Image, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
