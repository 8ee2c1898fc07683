"""``--montage PNG``: the query beside its hits, read back from the slides (patches) or the stores
(slide thumbnails), each captioned with its rank, slide, cell and distance."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import WsiEmbedError
from ..qc import _FONT, write_png_atomic
from .index import SearchIndex

log = logging.getLogger(__name__)

TILE = 192  # px per picture in the montage
_CAPTION = 44
_MISSING = (200, 200, 200)


def _fit(pixels: np.ndarray) -> Image.Image:
    im = Image.fromarray(pixels)
    im.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (TILE, TILE), (255, 255, 255))
    canvas.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    return canvas


def _read_cell(index: SearchIndex, hit: dict) -> np.ndarray | None:
    """The cell's pixels as ``embed`` read them (its level and read size); None when the slide file
    is gone or unreadable."""
    from ..slide import open_slide

    s = index.slides[index.slide_number(hit["slide_id"])]
    path = s.get("slide_path")
    try:
        with open_slide(Path(path)) as slide:
            return slide.read_region((hit["x"], hit["y"]), s["level"], (s["read_px"], s["read_px"]))
    except (WsiEmbedError, OSError, TypeError) as exc:
        log.warning("%s: cannot read cell (%d, %d) back from %s (%s)", hit["slide_id"], hit["row"], hit["col"],
                    path, exc)
        return None


def _thumbnail(index: SearchIndex, slide_id: str) -> np.ndarray | None:
    from ..store import open_store

    s = index.slides[index.slide_number(slide_id)]
    store = index.path.parent / s["store"]
    try:
        return open_store(store)._geometry("thumbnail")[...]
    except (WsiEmbedError, OSError) as exc:
        log.warning("%s: cannot read the thumbnail of %s (%s)", slide_id, store, exc)
        return None


def draw_montage(index: SearchIndex, result: dict, path: Path, *, query_image: np.ndarray | None = None) -> Path:
    """Write the montage of ``result`` (from :func:`~wsi_embed.search.search`) to ``path``."""
    q = result["query"]
    slides = q["kind"] == "slide"
    if slides:
        first = _thumbnail(index, q["slide_id"])
        label = [f"query {q['slide_id']}"]
    elif q["kind"] == "patch":
        first = _read_cell(index, q)
        label = [f"query {q['slide_id']}", f"cell {q['row']},{q['col']}"]
    else:
        first = query_image
        label = ["query", Path(q.get("image") or "embedding").name]
    pictures = [(first, label)]
    for rank, hit in enumerate(result["hits"], 1):
        pixels = _thumbnail(index, hit["slide_id"]) if slides else _read_cell(index, hit)
        where = f"#{rank} {hit['slide_id']}" if slides else f"#{rank} {hit['slide_id']} {hit['row']},{hit['col']}"
        pictures.append((pixels, [where, f"distance {hit['distance']:.4f}"]))
    font = ImageFont.truetype(str(_FONT), 13)
    gap = 8
    width = len(pictures) * (TILE + gap) + gap
    canvas = Image.new("RGB", (width, TILE + _CAPTION + 2 * gap), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    for i, (pixels, lines) in enumerate(pictures):
        x = gap + i * (TILE + gap)
        tile = _fit(pixels) if pixels is not None else Image.new("RGB", (TILE, TILE), _MISSING)
        canvas.paste(tile, (x, gap))
        if i == 0:  # the query framed in red
            pen.rectangle([x - 3, gap - 3, x + TILE + 2, gap + TILE + 2], outline=(220, 0, 0), width=3)
        for j, text in enumerate(lines):
            while text and pen.textlength(text, font=font) > TILE:
                text = text[:-2] + "…"
            pen.text((x, gap + TILE + 4 + 16 * j), text, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png_atomic(canvas, path)
