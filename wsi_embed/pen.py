"""Pen marks: marker ink (blue, green, red, black) found on the thumbnail.

Pathologists circle lesions on the glass; under a saturation Otsu the ink scores as tissue and a
model then learns the ink. The rules are hue/saturation/value boxes of the kind histolab and
slideflow use as RGB boxes, written so that H&E stays clear of them; the clean-up is scikit-image's:

- haematoxylin and eosin sit at hues 0.70-0.96 (purple to pink), the pen hues are outside it:
  blue 0.52-0.68, green 0.20-0.50, red above 0.945 or below 0.04 (and strongly saturated);
- black marker is what is darker than any stain at thumbnail scale (value below 0.27).

Blood (bright red-orange) can pass for red marker; ``--pen-marks keep`` turns the removal off.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

PEN_MODES = ("remove", "keep")
INK_COLOURS = ("blue", "green", "red", "black")

# (hue low, hue high, min saturation, min value, max value), hue in [0, 1)
_HSV_BOXES = {
    "blue": (0.52, 0.68, 0.35, 0.15, 1.0),
    "green": (0.20, 0.50, 0.20, 0.15, 1.0),
    "red": (0.945, 1.04, 0.6, 0.25, 1.0),  # wraps past 1.0: hue < 0.04 counts too
}
_BLACK_MAX_VALUE = 0.27
_BLACK_MAX_SATURATION = 0.6  # dark blue/green marker is also caught here; that is still ink


def ink_masks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Per-colour boolean masks of ink pixels in an (h, w, 3) uint8 image (no clean-up)."""
    if rgb.size == 0:
        return {c: np.zeros(rgb.shape[:2], bool) for c in INK_COLOURS}
    # Pillow's HSV: the same values as skimage's rgb2hsv within 1/255, 10x faster (slides are
    # prepared while the encoder runs, on the same cores)
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("HSV"), dtype=np.float32) / 255.0
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    out = {}
    for colour, (h0, h1, s_min, v_min, v_max) in _HSV_BOXES.items():
        in_hue = (hue >= h0) & (hue <= h1)
        if h1 > 1.0:
            in_hue |= hue <= h1 - 1.0
        out[colour] = in_hue & (sat >= s_min) & (val >= v_min) & (val <= v_max)
    out["black"] = (val < _BLACK_MAX_VALUE) & (sat <= _BLACK_MAX_SATURATION)
    return out


def detect_ink(rgb: np.ndarray, um_per_px: float, *, min_object_um2: float = 2_000.0,
               margin_um: float = 8.0) -> tuple[np.ndarray, dict[str, int]]:
    """Boolean ink mask of a thumbnail and the pixel count of each colour.

    Specks smaller than ``min_object_um2`` are dropped (a few dark nuclei are not a pen stroke);
    what is left grows by ``margin_um``, the stroke's soft edge that no colour box catches."""
    from scipy import ndimage
    from skimage import morphology

    masks = ink_masks(rgb)
    ink = np.zeros(rgb.shape[:2], bool)
    for m in masks.values():
        ink |= m
    if not ink.any():
        return ink, {c: 0 for c in INK_COLOURS}
    px_area = um_per_px * um_per_px
    ink = morphology.remove_small_objects(ink, max_size=max(1, int(min_object_um2 / px_area)))
    radius = round(margin_um / um_per_px)
    if radius >= 1 and ink.any():
        ink = ndimage.binary_dilation(ink, structure=morphology.disk(radius).astype(bool))
    counts = {c: int((m & ink).sum()) for c, m in masks.items()}
    log.debug("ink pixels by colour: %s", counts)
    return ink, counts

