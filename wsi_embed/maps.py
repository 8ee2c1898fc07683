"""Embedding maps: each embedded cell painted on the thumbnail with the colour of its embedding.

- PCA map ``<out>/<slide_id>.<group>.map.png``: the first three principal components of the cells'
  embeddings as red, green and blue. ``<group>`` is the encoder's group name in the store
  (``timm:foo`` -> ``timm-foo``).
- Cluster map ``<out>/<slide_id>.<group>.clusters.png`` (with ``clusters=K``): k-means labels of the
  cells, one colour per cluster, with a legend.

A :class:`Projection` holds the fitted PCA (and k-means centres). Fitted on one slide's cells the
colours say what differs inside that slide; fitted on a sample of a cohort (:func:`fit_cohort`, a
fixed number of cells drawn from every slide with a seed taken from its id) the same colour means
the same embedding on every slide. The sign of each component is fixed (its largest loading is
positive) and colours are scaled between the 1st and 99th percentile of the fitting sample, so the
same cells give the same picture on every run.

These are readers of finished stores: embeddings are read one band of chunk rows at a time.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import WsiEmbedError
from .grid import Grid, cells_under
from .qc import _FONT, _MAX_SIDE, _MIN_SIDE, _with_caption, write_png_atomic
from .store import EmbeddingStore, group_name, open_store, store_slide_id

log = logging.getLogger(__name__)

COHORT_BUDGET = 20_000  # cells sampled over a whole cohort to fit the PCA and k-means
MIN_PER_SLIDE = 16  # ... but at least this many from each slide (all of a smaller slide's cells)
MAX_CLUSTERS = 20
# tab20-like: strong colours first, so K <= 10 gets the most distinct ones
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229)], dtype=np.uint8)
_ALPHA = 0.88  # cell colour over the (greyed) thumbnail: the colour reads, the tissue still shows


def map_path_for(out_dir: Path, slide_id: str, encoder: str) -> Path:
    return Path(out_dir) / f"{slide_id}.{group_name(encoder)}.map.png"


def clusters_path_for(out_dir: Path, slide_id: str, encoder: str) -> Path:
    return Path(out_dir) / f"{slide_id}.{group_name(encoder)}.clusters.png"


# -- fitting ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """PCA(3) of embeddings to RGB, and optionally k-means centres, fitted on a sample of cells."""

    encoder: str
    mean: np.ndarray  # (dim,)
    components: np.ndarray  # (3, dim); rows of zeros where the sample had fewer components
    low: np.ndarray  # (3,) 1st percentile of each component's scores on the sample
    high: np.ndarray  # (3,) 99th percentile
    centres: np.ndarray | None = None  # (K, dim), largest cluster of the sample first
    slides: int = 1  # slides the sample came from
    cells: int = 0  # cells in the sample

    def colours(self, feats: np.ndarray) -> np.ndarray:
        """(n, dim) embeddings -> (n, 3) uint8 RGB."""
        scores = (np.asarray(feats, np.float32) - self.mean) @ self.components.T
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        unit = np.clip((scores - self.low) / span, 0.0, 1.0)
        unit[:, self.high <= self.low] = 0.5  # a component the sample did not have: mid grey
        return np.rint(unit * 255).astype(np.uint8)

    def labels(self, feats: np.ndarray) -> np.ndarray:
        """(n, dim) embeddings -> (n,) index of the nearest k-means centre."""
        if self.centres is None:
            raise ValueError("this projection was fitted without clusters")
        f = np.asarray(feats, np.float32)
        d = (f * f).sum(1)[:, None] - 2 * f @ self.centres.T + (self.centres * self.centres).sum(1)[None, :]
        return d.argmin(1).astype(np.int16)

    @property
    def scope(self) -> str:
        if self.slides > 1:
            return f"a sample of {self.cells} cells from {self.slides} slides"
        return f"this slide's {self.cells} cells"


def fit_projection(feats: np.ndarray, *, encoder: str, clusters: int | None = None,
                   slides: int = 1) -> Projection:
    """Fit PCA(3) (and k-means with ``clusters`` centres) on ``feats`` (n, dim). The PCA is numpy's
    SVD of the centred sample, as scikit-learn's full solver computes it (whose import alone takes
    a second at the end of every run)."""
    feats = np.asarray(feats, np.float32)
    feats = feats[np.isfinite(feats).all(axis=1)]
    n, dim = feats.shape
    mean = feats.mean(0) if n else np.zeros(dim, np.float32)
    components = np.zeros((3, dim), np.float32)
    low, high = np.zeros(3, np.float32), np.zeros(3, np.float32)
    k = min(3, n - 1, dim) if n > 1 else 0
    if k > 0 and float(np.ptp(feats, axis=0).max()) > 0:
        comps = np.linalg.svd(feats - mean, full_matrices=False)[2][:k].astype(np.float32)
        # deterministic sign: the largest loading of each component is positive
        big = np.abs(comps).argmax(1)
        comps *= np.sign(comps[np.arange(k), big])[:, None]
        components[:k] = comps
        scores = (feats - mean) @ comps.T
        low[:k], high[:k] = np.percentile(scores, 1, axis=0), np.percentile(scores, 99, axis=0)
    centres = None
    if clusters is not None and n:
        centres = _kmeans(feats, min(int(clusters), n))
    return Projection(encoder, mean, components, low, high, centres, slides, n)


def _kmeans(feats: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=4, random_state=0).fit(feats)
    sizes = np.bincount(km.labels_, minlength=k)
    order = np.lexsort((np.arange(k), -sizes))  # largest first; ties by index: stable numbering
    return km.cluster_centers_.astype(np.float32)[order]


def _bands(store: EmbeddingStore, encoder: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(r0, mask band, float32 embeddings of the band's mask cells), one band of chunk rows at a time."""
    emb = store.embeddings(encoder)
    mask = store.mask
    band = max(1, int(emb.chunks[0]))
    for r0 in range(0, mask.shape[0], band):
        m = mask[r0 : r0 + band]
        if m.any():
            yield r0, m, np.asarray(emb[r0 : r0 + band][m], np.float32)


def _seed(slide_id: str) -> int:
    return zlib.crc32(slide_id.encode())


def sample_cells(store: EmbeddingStore, encoder: str, k: int) -> np.ndarray:
    """Up to ``k`` embedded cells' embeddings (k, dim), drawn with a seed taken from the slide id."""
    mask = store.mask
    n = int(mask.sum())
    dim = int(store.embeddings(encoder).shape[2])
    if n == 0:
        return np.zeros((0, dim), np.float32)
    rng = np.random.default_rng(_seed(_slide_id(store)))
    keep = np.sort(rng.choice(n, size=min(k, n), replace=False))
    out, seen = [], 0
    for _, m, feats in _bands(store, encoder):
        here = keep[(keep >= seen) & (keep < seen + len(feats))] - seen
        out.append(feats[here])
        seen += len(feats)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def fit_cohort(stores: Sequence[EmbeddingStore], encoder: str, *, clusters: int | None = None,
               budget: int = COHORT_BUDGET) -> Projection:
    """One projection for all ``stores``: fitted on up to ``budget`` cells drawn evenly from them."""
    per_slide = max(MIN_PER_SLIDE, budget // max(1, len(stores)))
    parts = [sample_cells(s, encoder, per_slide) for s in stores]
    dim = next((p.shape[1] for p in parts if p.size), 0)
    feats = np.concatenate([p for p in parts if p.size]) if dim else np.zeros((0, 1), np.float32)
    return fit_projection(feats, encoder=encoder, clusters=clusters, slides=len(stores))


# -- painting --------------------------------------------------------------------------------------
@dataclass
class MapPicture:
    """A map and where things are in it (tests and callers locate cells in the PNG with these)."""

    image: Image.Image
    colours: np.ndarray  # (rows, cols, 3) uint8, each embedded cell's colour (0 elsewhere)
    mask: np.ndarray  # (rows, cols) bool
    zoom: float  # picture px per thumbnail px
    top: int  # caption height: the thumbnail starts this many px down
    scale: tuple[float, float] = (1.0, 1.0)  # picture px per level-0 px (x, y), below the caption
    labels: np.ndarray | None = field(default=None)  # (rows, cols) cluster index, -1 elsewhere


def _slide_id(store: EmbeddingStore) -> str:
    return store.attrs.get("slide", {}).get("slide_id") or store_slide_id(store.path)


def cell_values(store: EmbeddingStore, projection: Projection) -> tuple[np.ndarray, np.ndarray | None]:
    """Every embedded cell's RGB (rows, cols, 3) and, with centres, its cluster (rows, cols), -1 elsewhere."""
    mask = store.mask
    rgb = np.zeros(mask.shape + (3,), np.uint8)
    labels = None if projection.centres is None else np.full(mask.shape, -1, np.int16)
    for r0, m, feats in _bands(store, projection.encoder):
        rr, cc = np.nonzero(m)
        rgb[rr + r0, cc] = projection.colours(feats)
        if labels is not None:
            labels[rr + r0, cc] = projection.labels(feats)
    return rgb, labels


def paint(thumbnail: np.ndarray, grid: Grid, coords: np.ndarray, mask: np.ndarray, rgb: np.ndarray, *,
          scale_x: float, scale_y: float) -> tuple[Image.Image, float]:
    """The thumbnail, greyed, with each embedded cell's stride square (centred on the cell) filled with its colour.
    Returns the picture and its zoom (picture px per thumbnail px)."""
    h, w = thumbnail.shape[:2]
    zoom = min(_MAX_SIDE / max(h, w, 1), max(1.0, _MIN_SIDE / max(h, w, 1)))
    W, H = max(1, round(w * zoom)), max(1, round(h * zoom))
    grey = np.asarray(Image.fromarray(thumbnail).convert("L").resize((W, H), Image.Resampling.LANCZOS), np.float32)
    base = 255 - (255 - grey) * 0.6  # lighter: the colours carry the picture
    sx, sy = scale_x * zoom, scale_y * zoom
    out = np.repeat(base[:, :, None], 3, axis=2)
    if mask.any():
        col, okx = cells_under((np.arange(W) + 0.5) / sx, coords[0, :, 0], grid.stride0, grid.cell_size0)
        row, oky = cells_under((np.arange(H) + 0.5) / sy, coords[:, 0, 1], grid.stride0, grid.cell_size0)
        inside = oky[:, None] & okx[None, :] & mask[row[:, None], col[None, :]]
        colour = rgb[row[:, None], col[None, :]].astype(np.float32)
        out[inside] = (1 - _ALPHA) * out[inside] + _ALPHA * colour[inside]
    return Image.fromarray(np.rint(out).astype(np.uint8), "RGB"), zoom


def _legend(picture: Image.Image, counts: np.ndarray) -> Image.Image:
    """A row of colour swatches under the picture: cluster number and its share of the cells."""
    W = picture.width
    size = max(14, min(28, round(W / 80)))
    font = ImageFont.truetype(str(_FONT), size)
    total = max(1, int(counts.sum()))
    items = [(PALETTE[i % len(PALETTE)], f"{i}: {100 * c / total:.0f}%") for i, c in enumerate(counts)]
    probe = ImageDraw.Draw(picture)
    widths = [size * 2 + probe.textlength(t, font=font) + size for _, t in items]
    lines, x = 1, size
    for wd in widths:
        if x + wd > W and x > size:
            lines, x = lines + 1, size
        x += wd
    step = round(size * 1.6)
    canvas = Image.new("RGB", (W, picture.height + lines * step + size), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    pen = ImageDraw.Draw(canvas)
    x, y = size, picture.height + size // 2
    for (colour, text), wd in zip(items, widths):
        if x + wd > W and x > size:
            x, y = size, y + step
        pen.rectangle((x, y, x + size, y + size), fill=tuple(int(v) for v in colour), outline=(0, 0, 0))
        pen.text((x + size * 1.5, y - size // 8), text, fill=(0, 0, 0), font=font)
        x += wd
    return canvas


def render_maps(store: EmbeddingStore, projection: Projection) -> tuple[MapPicture, MapPicture | None]:
    """The PCA map of one store's encoder (and its cluster map when the projection has centres)."""
    enc = projection.encoder
    attrs = store.attrs
    grid = Grid.from_attrs(attrs["grid"])
    sx, sy = attrs["tissue"]["thumbnail_scale"]
    thumbnail = store._geometry("thumbnail")[...]
    coords, mask = store.coords, store.mask
    rgb, labels = cell_values(store, projection)
    random = bool(store.encoder_attrs(enc).get("weights_random"))
    slide_id = _slide_id(store)
    tag = " (RANDOM WEIGHTS)" if random else ""
    picture, zoom = paint(thumbnail, grid, coords, mask, rgb, scale_x=sx, scale_y=sy)
    title = (f"{slide_id}: embedding map of {int(mask.sum())} cells, encoder {enc}{tag}; PCA -> RGB "
             f"(PC1 red, PC2 green, PC3 blue) fitted on {projection.scope}")
    captioned = _with_caption(picture, title)
    top = captioned.height - picture.height
    pca = MapPicture(captioned, rgb, mask, zoom, top, (sx * zoom, sy * zoom))
    if labels is None:
        return pca, None
    k = len(projection.centres)
    crgb = PALETTE[np.clip(labels, 0, None) % len(PALETTE)]
    cpicture, _ = paint(thumbnail, grid, coords, mask, crgb, scale_x=sx, scale_y=sy)
    title = (f"{slide_id}: k-means, {k} clusters of embeddings, encoder {enc}{tag}; fitted on "
             f"{projection.scope}")
    captioned = _with_caption(cpicture, title)
    counts = np.bincount(labels[mask].astype(np.int64), minlength=k)
    return pca, MapPicture(_legend(captioned, counts), crgb, mask, zoom, captioned.height - cpicture.height,
                           (sx * zoom, sy * zoom), labels)


# -- whole folders ---------------------------------------------------------------------------------
@dataclass
class MapsResult:
    written: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line each: a store whose maps were not drawn


def check_clusters(clusters: int | None) -> None:
    from .errors import InvalidOption

    if clusters is not None and not 2 <= clusters <= MAX_CLUSTERS:
        raise InvalidOption(f"--clusters {clusters}: give a number of clusters from 2 to {MAX_CLUSTERS}")


def write_maps(stores: Sequence[str | Path], *, clusters: int | None = None, cohort: bool = True,
               out_dir: str | Path | None = None) -> MapsResult:
    """Write the maps of every complete encoder group of ``stores`` (beside each store, or in
    ``out_dir``). ``cohort``: one projection per encoder fitted on a sample of all the stores (the
    colours compare across slides); else one per slide. A store that cannot be read is skipped
    with a line in :attr:`MapsResult.problems`."""
    check_clusters(clusters)
    result = MapsResult()
    opened: list[EmbeddingStore] = []
    for path in stores:
        try:
            opened.append(open_store(path))
        except WsiEmbedError as exc:
            result.problems.append(f"{path}: no embedding map: {exc}")
    by_encoder: dict[str, list[EmbeddingStore]] = {}
    for store in opened:
        for enc in store.encoders:
            by_encoder.setdefault(enc, []).append(store)
    for enc, group in by_encoder.items():
        shared = None
        if cohort and len(group) > 1:
            try:
                shared = fit_cohort(group, enc, clusters=clusters)
            except WsiEmbedError as exc:  # one damaged store: fit on the others
                good = [s for s in group if _readable(s, enc)]
                result.problems.append(f"cohort map fit for {enc}: {exc}; fitted on {len(good)} other slides")
                shared = fit_cohort(good, enc, clusters=clusters) if good else None
        for store in group:
            try:
                projection = shared or fit_projection(sample_cells(store, enc, COHORT_BUDGET), encoder=enc,
                                                      clusters=clusters)
                pca, clustered = render_maps(store, projection)
                where = Path(out_dir) if out_dir is not None else store.path.parent
                sid = _slide_id(store)
                result.written.append(write_png_atomic(pca.image, map_path_for(where, sid, enc)))
                if clustered is not None:
                    result.written.append(write_png_atomic(clustered.image, clusters_path_for(where, sid, enc)))
                drawn = 0 if projection.centres is None or clustered is None else len(projection.centres)
                if clusters is not None and drawn < clusters:
                    result.problems.append(
                        f"{store.path}: {enc}: no cluster map, the fit had no embedded cell" if not drawn else
                        f"{store.path}: {enc}: only {drawn} of {clusters} clusters drawn: the fit had {drawn} cell(s)")
            except WsiEmbedError as exc:
                result.problems.append(f"{store.path}: no {enc} embedding map: {exc}")
            except OSError as exc:
                result.problems.append(f"{store.path}: the {enc} embedding map cannot be written "
                                       f"({exc.strerror or exc}); check the output folder")
    log.info("%d embedding maps written", len(result.written))
    return result


def _readable(store: EmbeddingStore, encoder: str) -> bool:
    try:
        sample_cells(store, encoder, MIN_PER_SLIDE)
    except WsiEmbedError:
        return False
    return True
