"""The QC picture: thumbnail, tissue contour and the embedded cells, checkable at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import write_atomic
from .grid import Grid

_FONT = Path(__file__).with_name("fonts") / "DejaVuSans.ttf"  # bundled: Pillow's default lacks µ
TISSUE_COLOUR = (0, 200, 0)
CELL_COLOUR = (20, 60, 255)
INK_COLOUR = (255, 140, 0)  # pen marks (orange: no marker or stain is orange)
_MIN_SIDE, _MAX_SIDE = 1024, 2400


def render_qc(thumbnail: np.ndarray, tissue_mask: np.ndarray, grid: Grid, coords: np.ndarray,
              embedded: np.ndarray, *, scale_x: float, scale_y: float, title: str,
              ink: np.ndarray | None = None, ink_removed: bool = True) -> Image.Image:
    """Embedded cells tinted and outlined in blue, the tissue contour in green, pen ink in orange
    (``ink_removed``: taken out of the tissue, ``--pen-marks remove``), a caption on top."""
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
        # a cell smaller than a picture pixel still covers one: on large slides cells must not vanish
        x1, y1 = np.maximum(x1, np.minimum(x0 + 1, W)), np.maximum(y1, np.minimum(y0 + 1, H))
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
        small = grid.cell_size0 * min(sx, sy) < 6  # outlining each cell would fill it: outline the region
        if small:
            from scipy import ndimage

            outline = covered & ~ndimage.binary_erosion(covered, iterations=max(1, round(max(W, H) / 700)),
                                                        border_value=0)
        overlay[covered] = CELL_COLOUR + (90 if small else 50,)
        overlay[outline] = CELL_COLOUR + (220,)
    overlay = Image.fromarray(overlay, "RGBA")
    line = max(2, round(max(W, H) / 350))  # scaled to the picture: still seen in a report thumbnail
    # the tissue contour: mask pixels (at picture size) within `line` px of the background
    from scipy import ndimage

    big = np.asarray(Image.fromarray(tissue_mask.astype(np.uint8) * 255).resize((W, H), Image.Resampling.NEAREST)) > 0
    contour = big & ~ndimage.binary_erosion(big, iterations=line, border_value=0)
    overlay = np.asarray(overlay).copy()
    overlay[contour] = TISSUE_COLOUR + (255,)
    if ink is not None and ink.any():  # pen marks filled in their own colour
        big_ink = Image.fromarray(ink.astype(np.uint8) * 255).resize((W, H), Image.Resampling.NEAREST)
        overlay[np.asarray(big_ink) > 0] = INK_COLOUR + (170,)
        title += f"; pen ink (orange, {'removed' if ink_removed else 'kept'})"
    overlay = Image.fromarray(overlay, "RGBA")
    picture = Image.alpha_composite(base, overlay).convert("RGB")
    return _with_caption(picture, title)


def _with_caption(picture: Image.Image, title: str) -> Image.Image:
    """The title above the picture in a TrueType font sized to it, wrapped to its width."""
    W = picture.width
    size = max(14, min(32, round(W / 70)))
    font = ImageFont.truetype(str(_FONT), size)
    draw = ImageDraw.Draw(picture)
    lines, line = [], ""
    for word in title.split(" "):
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > W - 2 * size:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    step = round(size * 1.3)
    caption_h = step * len(lines) + size
    canvas = Image.new("RGB", (W, picture.height + caption_h), (255, 255, 255))
    canvas.paste(picture, (0, caption_h))
    pen = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        pen.text((size, size // 2 + i * step), text, fill=(0, 0, 0), font=font)
    return canvas


def qc_title(slide_id: str, cells: int, patch_px: int, target_mpp: float, min_tissue: float,
             encoders: list[tuple[str, bool]]) -> str:
    """``encoders``: (name, weights are random) of the encoders the store is made for; listed by
    name, so a picture redrawn from the store (whose groups come in no fixed order) is the same."""
    names = ", ".join(f"{n} (RANDOM WEIGHTS)" if random else n for n, random in sorted(encoders)) or "-"
    return (f"{slide_id}: {cells} cells embedded (blue), tissue contour (green); {patch_px} px at "
            f"{target_mpp:g} µm/px, min tissue {min_tissue:g}; encoder {names}")


def qc_path_for(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / f"{slide_id}.qc.png"


def render_store_qc(store: Path) -> Image.Image:
    """The QC picture of a finished store, from what it recorded."""
    import zarr

    root = zarr.open_group(str(store), mode="r", zarr_format=3)
    attrs = root.attrs.asdict()
    grid = Grid.from_attrs(attrs["grid"])
    tissue = attrs["tissue"]
    sx, sy = tissue["thumbnail_scale"]
    mask = root["mask"][...]
    encoders = []
    for key, group in root.groups():
        a = group.attrs.asdict()
        if not key.startswith(".") and a.get("complete") is True:
            encoders.append((a["encoder"]["name"], bool(a["encoder"].get("weights_random"))))
    title = qc_title(attrs["slide"]["slide_id"], int(mask.sum()), grid.patch_px, grid.target_mpp,
                     tissue["min_tissue"], encoders)
    return render_qc(root["thumbnail"][...], root["tissue_mask"][...], grid, root["coords"][...], mask,
                     scale_x=sx, scale_y=sy, title=title, ink=root["ink_mask"][...] if "ink_mask" in root else None,
                     ink_removed=tissue.get("pen_marks", "remove") == "remove")


def write_png_atomic(image: Image.Image, path: Path) -> Path:
    """Write under a temporary name and rename: a reader never sees half a picture, and a failed
    write (full disk) leaves nothing behind."""
    # compress_level 1: fast; the picture is for eyes, not archives
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))
