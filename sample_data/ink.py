"""A synthetic slide of real tissue with pen-marker strokes drawn on it, and its clean twin.

The tissue is the sample slide's pixels (:func:`sample_data.synthetic.sample_rgb`); the strokes
are drawn with ``skimage.draw`` over tissue and over glass in blue, green, red and black, as a
translucent marker does: the pixel is multiplied by the ink colour (alpha 0.9), with a soft edge.
Both slides are written as JPEG pyramids (:func:`sample_data.synthetic.write_pyramid`).

    python -m sample_data.ink OUTDIR
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .synthetic import MAX_LEVELS, area_downsample, sample_rgb, write_pyramid

# marker colours (what the ink does to white light), typical of lab markers
INKS = {"blue": (30, 60, 170), "green": (30, 140, 70), "red": (200, 30, 40), "black": (35, 35, 40)}
ALPHA = 0.9


def _stroke(shape: tuple[int, int], points: Sequence[tuple[float, float]], width: float) -> np.ndarray:
    """Boolean mask of a thick polyline (x, y points): one rectangle per segment, a disk per joint."""
    from skimage import draw

    mask = np.zeros(shape, bool)
    half = width / 2
    pts = np.asarray(points, dtype=float)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        n = float(np.hypot(dx, dy)) or 1.0
        nx, ny = -dy / n * half, dx / n * half
        rr, cc = draw.polygon([y0 + ny, y1 + ny, y1 - ny, y0 - ny], [x0 + nx, x1 + nx, x1 - nx, x0 - nx], shape)
        mask[rr, cc] = True
    for x, y in pts:
        rr, cc = draw.disk((y, x), half, shape=shape)
        mask[rr, cc] = True
    return mask


def _ring(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float], width: float) -> np.ndarray:
    """A drawn ellipse (a lesion circled on the glass)."""
    from skimage import draw

    (cx, cy), (rx, ry) = centre, radii
    outer = np.zeros(shape, bool)
    outer[draw.ellipse(cy, cx, ry + width / 2, rx + width / 2, shape)] = True
    inner = np.zeros(shape, bool)
    inner[draw.ellipse(cy, cx, ry - width / 2, rx - width / 2, shape)] = True
    return outer & ~inner


def default_strokes(width: int, height: int) -> list[tuple[str, np.ndarray]]:
    """(colour, mask) of the default strokes, in proportion to the slide: a blue ring around a
    region, a green zig-zag, a red line and a black arrow-like stroke, crossing tissue and glass."""
    shape = (height, width)
    w, h = width, height
    return [
        ("blue", _ring(shape, (0.30 * w, 0.40 * h), (0.16 * w, 0.22 * h), 0.05 * w)),
        ("green", _stroke(shape, [(0.58 * w, 0.08 * h), (0.68 * w, 0.45 * h), (0.78 * w, 0.12 * h),
                                  (0.92 * w, 0.40 * h)], 0.05 * w)),
        ("red", _stroke(shape, [(0.05 * w, 0.88 * h), (0.60 * w, 0.72 * h)], 0.06 * w)),
        ("black", _stroke(shape, [(0.70 * w, 0.92 * h), (0.95 * w, 0.62 * h), (0.88 * w, 0.62 * h)], 0.05 * w)),
    ]


def apply_ink(rgb: np.ndarray, strokes: Sequence[tuple[str, np.ndarray]], *, soft_px: float = 3.0) -> np.ndarray:
    """The image with each stroke multiplied in (translucent marker, soft edges)."""
    from scipy import ndimage

    out = rgb.astype(np.float32)
    pad = int(4 * soft_px) + 1
    for colour, mask in strokes:
        ys, xs = np.nonzero(mask)
        if not len(ys):
            continue
        y0, y1 = max(0, ys.min() - pad), min(mask.shape[0], ys.max() + pad + 1)
        x0, x1 = max(0, xs.min() - pad), min(mask.shape[1], xs.max() + pad + 1)
        part = mask[y0:y1, x0:x1].astype(np.float32)
        alpha = (ndimage.gaussian_filter(part, soft_px) if soft_px else part) * ALPHA
        ink = np.asarray(INKS[colour], np.float32) / 255
        out[y0:y1, x0:x1] *= 1 - alpha[..., None] * (1 - ink)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _write(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    levels = [rgb]
    while min(levels[-1].shape[:2]) > 512 and len(levels) < MAX_LEVELS:
        levels.append(area_downsample(levels[-1], 4))
    return write_pyramid(path, levels, mpp=mpp, compression="jpeg", photometric="rgb",
                         compressionargs={"level": 90})


def make_ink_slide(directory: str | Path, *, size: tuple[int, int] = (6144, 4096), mpp: float = 0.5,
                   origin: tuple[int, int] = (500, 600), seed: int = 0) -> dict:
    """Write ``inked.tif`` and ``clean.tif`` (the same pixels without ink) into ``directory``.

    Returns ``path``, ``clean_path``, ``ink`` ((h, w) bool level-0 truth: where the marker's
    opacity is at least half) and ``colours`` (the colours drawn)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width, height = size
    rgb = sample_rgb(width, height, origin=origin, seed=seed)
    strokes = default_strokes(width, height)
    clean = _write(directory / "clean.tif", rgb, mpp)
    inked = _write(directory / "inked.tif", apply_ink(rgb, strokes), mpp)
    truth = np.zeros((height, width), bool)
    for _, mask in strokes:
        truth |= mask
    return {"path": inked, "clean_path": clean, "ink": truth, "colours": [c for c, _ in strokes]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    made = make_ink_slide(args.out)
    print(f"wrote {made['path']} and {made['clean_path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
