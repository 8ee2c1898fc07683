"""User tissue masks (``--tissue-mask``) and GeoJSON annotations (``--annotations``).

- A tissue mask is a binary PNG or TIFF of the whole slide at any scale (non-zero is tissue): its
  scale is its size against level 0, the same on both axes (within a pixel of rounding and 1%). It
  is resampled (area average, then half) to the thumbnail and replaces the detected tissue.
- Annotations are GeoJSON as QuPath and TRIDENT write it (a FeatureCollection, a list of features,
  one feature or one geometry) in level-0 pixels. Polygons and MultiPolygons (holes honoured) are
  kept; points and lines are skipped, and so are QuPath detections and cells. A cell belongs to an
  annotation when its centre lies inside it; when annotations overlap the smallest one wins (a
  tumour drawn inside a tissue outline labels its cells tumour).

A spec is a file (used for the slide) or a folder holding ``<slide_id>.png|.tif|.tiff`` (masks) or
``<slide_id>.geojson|.json`` (annotations). Every problem raises :class:`~wsi_embed.errors.BadMask`
naming the file; in a cohort only that slide fails.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadMask, MaskNotFound

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".png", ".tif", ".tiff")
ANNOTATION_SUFFIXES = (".geojson", ".json")
_ASPECT_TOLERANCE = 0.01  # relative, on top of one pixel of rounding on each side
_OUTSIDE_TOLERANCE_PX = 1.0  # level-0 px a vertex may lie beyond the slide's edge
_SKIPPED_OBJECT_TYPES = {"detection", "cell", "tile"}  # QuPath objects that are not drawn regions


def resolve(spec: str | Path | None, slide_id: str, suffixes: tuple[str, ...], what: str) -> Path | None:
    """The file for this slide: ``spec`` itself, or ``spec/<slide_id><suffix>`` for a folder."""
    if spec is None:
        return None
    spec = Path(spec)
    if spec.is_dir():
        for suffix in suffixes:
            for candidate in (spec / f"{slide_id}{suffix}", spec / f"{slide_id}{suffix.upper()}"):
                if candidate.is_file():
                    return candidate
        raise MaskNotFound(f"{spec}: no {what} for slide {slide_id} (looked for {slide_id}"
                           f"{'|'.join(suffixes)}); add it, or give this slide's file in the --list CSV")
    if not spec.is_file():
        raise MaskNotFound(f"{spec}: {what} of slide {slide_id} not found; check the path")
    return spec


def check_one_file_specs(jobs, opts) -> None:
    """A single mask or annotation *file* (not a folder) names one slide's regions: refuse it for a
    run of several slides that lack their own (a ``--list`` column), instead of applying one slide's
    annotation to all of them."""
    from .errors import InvalidOption

    if opts.annotation_classes and opts.annotations is None and not any(getattr(j, "annotations", None) for j in jobs):
        raise InvalidOption("--annotation-classes keeps cells of those annotation classes, but no annotations are "
                            "given; add --annotations (or an annotations column to the --list CSV)")
    for flag, spec, own in (("--tissue-mask", opts.tissue_mask, "tissue_mask"),
                            ("--annotations", opts.annotations, "annotations")):
        if spec is None or Path(spec).is_dir():
            continue
        using = [j for j in jobs if not getattr(j, own, None)]
        if len(using) > 1:
            raise InvalidOption(f"{flag} {spec} is one file, but {len(using)} slides would use it "
                                f"({', '.join(j.slide_id for j in using[:3])}{', ...' if len(using) > 3 else ''}); "
                                f"give a folder of <slide_id> files, or the {own} column of a --list CSV")


# -- masks ---------------------------------------------------------------------------------------
def read_mask_file(path: Path) -> np.ndarray:
    """(h, w) bool: non-zero pixels (any channel) of a PNG or TIFF."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            data = tifffile.imread(path, key=0)
        else:
            from PIL import Image

            guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # slide masks are large by nature
            try:
                with Image.open(path) as image:
                    image.load()
                    data = np.asarray(image.convert("L") if image.mode in ("P", "PA", "RGBA", "LA") else image)
            finally:
                Image.MAX_IMAGE_PIXELS = guard
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise BadMask(f"{path}: cannot read the tissue mask ({type(exc).__name__}: {exc}); "
                      "give a binary PNG or TIFF (non-zero = tissue)") from None
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[-1] in (1, 2, 3, 4):
        data = data[..., :3].max(axis=-1) if data.shape[-1] >= 3 else data[..., 0]
    if data.ndim != 2 or data.size == 0:
        raise BadMask(f"{path}: the tissue mask has shape {data.shape}, not (height, width); "
                      "give a single-channel binary image")
    return data != 0


def mask_scale(path: Path, mask_shape: tuple[int, int], slide_size: tuple[int, int]) -> float:
    """The mask's px per level-0 px; raises when its aspect ratio is not the slide's."""
    mh, mw = mask_shape
    w0, h0 = slide_size
    sx, sy = mw / w0, mh / h0
    tolerance = _ASPECT_TOLERANCE + 1.0 / min(mw, mh) + 1.0 / min(w0, h0)
    if abs(sx / sy - 1) > tolerance:
        raise BadMask(f"{path}: the mask is {mw} x {mh} px and the slide {w0} x {h0} px: the aspect ratios "
                      f"differ ({mw / mh:.4g} vs {w0 / h0:.4g}); give a mask of the whole slide at one scale")
    return float(np.sqrt(sx * sy))


def load_user_mask(path: Path, slide_size: tuple[int, int], thumb_shape: tuple[int, int]) -> np.ndarray:
    """The user's mask at thumbnail size (area average >= 0.5), after the scale check."""
    from PIL import Image

    mask = read_mask_file(path)
    scale = mask_scale(path, mask.shape, slide_size)
    log.info("%s: tissue mask %d x %d px, %.4g px per level-0 px", path, mask.shape[1], mask.shape[0], scale)
    th, tw = thumb_shape
    if mask.shape == (th, tw):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((tw, th), Image.Resampling.BOX)) >= 128


# -- annotations ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Annotations:
    path: Path
    classes: list[str | None]  # label i is classes[i]; None: annotations without a class
    regions: list[tuple[int, object]]  # (label, shapely polygonal geometry), largest first

    def attrs(self, requested: tuple[str, ...] | None) -> dict:
        return {"path": str(Path(self.path).resolve()), "classes": self.classes, "kept_classes": list(requested) if requested else None,
                "regions": len(self.regions), "rule": "cell centre inside (smallest annotation wins)"}


def class_name(props: dict | None) -> str | None:
    """The class of a GeoJSON feature: QuPath's ``classification.name`` (0.2+), a ``classification``
    string, or ``class``/``classname``/``name`` (other exporters, TRIDENT-style outlines)."""
    if not isinstance(props, dict):
        return None
    c = props.get("classification")
    if isinstance(c, dict) and c.get("name"):
        return str(c["name"])
    if isinstance(c, str) and c:
        return c
    for key in ("class", "classname", "class_name", "label", "name"):
        v = props.get(key)
        if isinstance(v, (str, int)) and str(v):
            return str(v)
    return None


def _features(doc, path: Path) -> list[dict]:
    if isinstance(doc, list):
        return [f for f in doc if isinstance(f, dict)]
    if not isinstance(doc, dict):
        raise BadMask(f"{path}: not GeoJSON (a FeatureCollection, a feature or a geometry); "
                      "export the annotations as GeoJSON (QuPath: File > Export objects as GeoJSON)")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        return [f for f in doc.get("features") or [] if isinstance(f, dict)]
    if kind == "Feature":
        return [doc]
    if kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
        return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise BadMask(f"{path}: GeoJSON of type {kind!r}; give a FeatureCollection of polygons in level-0 pixels")


def _polygonal(geom):
    """The polygonal part of a shapely geometry (empty when it has none)."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    if hasattr(geom, "geoms"):
        parts = [g for g in (_polygonal(p) for p in geom.geoms) if not g.is_empty]
        return shapely.union_all(parts) if parts else Polygon()
    return Polygon()


def load_annotations(path: Path, slide_size: tuple[int, int], keep: tuple[str, ...] | None = None) -> Annotations:
    """Read a GeoJSON file: its polygonal annotations (of the ``keep`` classes, matched without
    regard to case, when given), checked to have an area and to lie on the slide."""
    import shapely
    from shapely.geometry import shape

    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadMask(f"{path}: cannot read the annotations ({type(exc).__name__}: {exc}); "
                      "give a GeoJSON file in level-0 pixels") from None
    w0, h0 = slide_size
    wanted = {k.casefold(): i for i, k in enumerate(keep)} if keep else None
    found: list[tuple[str | None, object]] = []
    seen_classes: list[str | None] = []
    skipped = 0
    for n, feature in enumerate(_features(doc, path), start=1):
        props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        if str(props.get("objectType", "annotation")).lower() in _SKIPPED_OBJECT_TYPES:
            skipped += 1
            continue
        name = class_name(props)
        raw = feature.get("geometry")
        if not isinstance(raw, dict) or raw.get("type") not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            skipped += 1  # points, lines and empty features mark no region
            continue
        where = f"feature {n}" + (f" (class {name})" if name else "")
        try:
            geom = shape(raw)
        except Exception as exc:  # noqa: BLE001 - malformed coordinates
            raise BadMask(f"{path}: {where} has malformed coordinates ({exc}); fix or remove it") from None
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        geom = _polygonal(geom)
        if geom.is_empty or geom.area <= 0:
            raise BadMask(f"{path}: {where} is an empty polygon (no area); remove it or redraw it")
        x0, y0, x1, y1 = geom.bounds
        t = _OUTSIDE_TOLERANCE_PX
        if x0 < -t or y0 < -t or x1 > w0 + t or y1 > h0 + t:
            raise BadMask(f"{path}: {where} reaches ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}), outside the slide "
                          f"(0, 0)-({w0}, {h0}); annotations must be in level-0 pixels of this slide")
        if name not in seen_classes:
            seen_classes.append(name)
        if wanted is not None and (name is None or name.casefold() not in wanted):
            continue
        found.append((name, geom))
    if skipped:
        log.info("%s: %d features skipped (not polygons, or QuPath detections)", path, skipped)
    if not found:
        have = ", ".join(str(c) for c in seen_classes) or "none"
        ask = f" of class {', '.join(keep)}" if keep else ""
        raise BadMask(f"{path}: no polygon annotation{ask} (classes there: {have}); "
                      "check the file and --annotation-classes")
    if keep:
        spelled = {n.casefold(): n for n, _ in found if n is not None}
        classes: list[str | None] = [spelled.get(k.casefold(), k) for k in keep]
        index = {c.casefold(): i for i, c in enumerate(classes)}
        label = [index[n.casefold()] for n, _ in found]
    else:
        classes = [c for c in seen_classes if any(n == c for n, _ in found)]
        label = [classes.index(n) for n, _ in found]
    order = sorted(range(len(found)), key=lambda i: -found[i][1].area)
    return Annotations(path, classes, [(label[i], found[i][1]) for i in order])


def label_cells(annotations: Annotations, coords: np.ndarray, cell_size0: float) -> np.ndarray:
    """(rows, cols) int16: each cell's annotation label (the class index), -1 outside every one.
    Cell centres are tested with shapely, within each region's bounding box only."""
    import shapely

    rows, cols = coords.shape[:2]
    labels = np.full((rows, cols), -1, dtype=np.int16)
    if rows == 0 or cols == 0:
        return labels
    cx = coords[0, :, 0].astype(np.float64) + cell_size0 / 2
    cy = coords[:, 0, 1].astype(np.float64) + cell_size0 / 2
    for label, geom in annotations.regions:  # largest first: smaller ones overwrite
        x0, y0, x1, y1 = geom.bounds
        c0, c1 = np.searchsorted(cx, x0, "left"), np.searchsorted(cx, x1, "right")
        r0, r1 = np.searchsorted(cy, y0, "left"), np.searchsorted(cy, y1, "right")
        if c0 >= c1 or r0 >= r1:
            continue
        shapely.prepare(geom)
        X, Y = np.meshgrid(cx[c0:c1], cy[r0:r1])
        inside = shapely.contains_xy(geom, X, Y)
        labels[r0:r1, c0:c1][inside] = label
    return labels
