"""Read an index folder and find nearest neighbours in it (exact numpy or usearch)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import IndexNotFound, InvalidQuery, WsiEmbedError
from .build import FORMAT, MANIFEST, PATCH_TABLE, PATCH_USEARCH, PATCH_VECTORS, SLIDE_VECTORS, store_fingerprint

log = logging.getLogger(__name__)

_ROWS_PER_STEP = 65_536  # exact search reads the patch matrix this many rows at a time


class SearchIndex:
    """An index built by :func:`~wsi_embed.search.build_index`. Patch vectors are memory-mapped (exact)
    or viewed from the usearch file, so opening it reads only the manifest, the slide vectors and the
    patch table."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise IndexNotFound(_not_found(self.path))
        try:
            self.manifest: dict = json.loads(manifest.read_text())
            if self.manifest.get("format") != FORMAT:
                raise ValueError(f"format {self.manifest.get('format')!r}")
            self.slide_vectors = np.load(self.path / SLIDE_VECTORS)
            self.table = np.load(self.path / PATCH_TABLE, mmap_mode="r")
            if self.kind == "exact":
                self._vectors = np.load(self.path / PATCH_VECTORS, mmap_mode="r")
                self._ann = None
            else:
                from usearch.index import Index

                self._vectors = None
                self._ann = Index.restore(str(self.path / PATCH_USEARCH), view=True)
                if self._ann is None:
                    raise ValueError(f"{PATCH_USEARCH} is not a usearch index")
        except (OSError, ValueError, KeyError) as exc:
            raise WsiEmbedError(f"{self.path}: this index is damaged or not a wsi-embed index ({exc}); "
                                "rebuild it with wsi-embed index OUT --encoder NAME") from None
        self.slides: list[dict] = self.manifest["slides"]
        self._number = {s["slide_id"]: i for i, s in enumerate(self.slides)}

    def changed_slides(self) -> list[str]:
        """Slides whose store beside the index was rebuilt or re-embedded since the index was built
        (stores that are not there, as for an index copied elsewhere, are not counted)."""
        changed = []
        for s in self.slides:
            store = self.path.parent / s["store"]
            if not s.get("store_fingerprint") or not store.is_dir():
                continue
            try:
                now = store_fingerprint(store, self.manifest["group"])
            except OSError:
                now = None  # its group is gone or unreadable: changed as well
            if now != s["store_fingerprint"]:
                changed.append(s["slide_id"])
        return changed

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def encoder(self) -> str:
        return self.manifest["encoder"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.table)

    def slide_number(self, slide_id: str) -> int:
        try:
            return self._number[slide_id]
        except KeyError:
            skipped = next((s for s in self.manifest.get("skipped", [])
                            if s.get("store") == f"{slide_id}.zarr"), None)
            if skipped is not None:  # embedded, but left out of the index: say why
                raise InvalidQuery(f"{self.path}: slide {slide_id!r} was left out of this index "
                                   f"({skipped.get('reason')}); a slide is searchable once it has embedded "
                                   "cells and a healthy store") from None
            some = ", ".join(list(self._number)[:5]) + (", ..." if len(self._number) > 5 else "")
            raise InvalidQuery(f"{self.path}: slide {slide_id!r} is not in this index ({len(self._number)} slides: "
                               f"{some}); check the id, or rebuild the index after embedding it") from None

    def cell_number(self, slide_id: str, row: int, col: int) -> int:
        """The patch-table row of an embedded cell."""
        s = self.slides[self.slide_number(slide_id)]
        if not (0 <= row < s["rows"] and 0 <= col < s["cols"]):
            raise InvalidQuery(f"{self.path}: cell ({row}, {col}) is outside the grid of {slide_id} "
                               f"({s['rows']} rows x {s['cols']} cols); give ROW,COL inside it")
        first, cells = s["first"], s["cells"]
        part = np.asarray(self.table[first : first + cells, 1:3])
        hit = np.flatnonzero((part[:, 0] == row) & (part[:, 1] == col))
        if not len(hit):
            raise InvalidQuery(f"{self.path}: cell ({row}, {col}) of {slide_id} was not embedded (outside its "
                               "tissue mask); pick a cell of its mask (wsi_embed.open_store(...).mask)")
        return first + int(hit[0])

    def patch_vector(self, number: int) -> np.ndarray:
        if self._ann is not None:
            return np.asarray(self._ann.get(np.uint64(number)), dtype=np.float32)
        return np.asarray(self._vectors[number], dtype=np.float32)

    def patch(self, number: int) -> dict:
        slide, row, col, x, y = (int(v) for v in self.table[number])
        return {"slide_id": self.slides[slide]["slide_id"], "row": row, "col": col, "x": x, "y": y}

    # -- nearest neighbours ----------------------------------------------------------------------
    def nearest_slides(self, query: np.ndarray, k: int, exclude: int | None = None) -> list[tuple[int, float]]:
        return _exact(self.slide_vectors, query, k, exclude)

    def nearest_patches(self, query: np.ndarray, k: int, exclude: int | None = None) -> list[tuple[int, float]]:
        if self._ann is None:
            return _exact(self._vectors, query, k, exclude)
        want = min(len(self), k + (exclude is not None))
        found = self._ann.search(np.asarray(query, np.float32), want)
        pairs = [(int(key), float(d)) for key, d in zip(found.keys, found.distances) if int(key) != exclude]
        pairs.sort(key=lambda p: (p[1], p[0]))
        return pairs[:k]


def _exact(vectors: np.ndarray, query: np.ndarray, k: int, exclude: int | None) -> list[tuple[int, float]]:
    """Cosine distance of ``query`` to every row (rows and query L2-normalised); the ``k`` smallest,
    ``exclude`` left out, ties broken by row number."""
    n = len(vectors)
    q = np.asarray(query, np.float32)
    best_i, best_d = np.empty(0, np.int64), np.empty(0, np.float32)
    for r0 in range(0, n, _ROWS_PER_STEP):
        d = 1.0 - np.asarray(vectors[r0 : r0 + _ROWS_PER_STEP], np.float32) @ q
        idx = np.arange(r0, r0 + len(d))
        if exclude is not None and r0 <= exclude < r0 + len(d):
            keep = idx != exclude
            d, idx = d[keep], idx[keep]
        if len(d) > k:
            part = np.argpartition(d, k)[: k + 1]  # k + 1: a tie at the border is resolved below
            d, idx = d[part], idx[part]
        best_i, best_d = np.concatenate([best_i, idx]), np.concatenate([best_d, d])
    order = np.lexsort((best_i, best_d))[:k]
    return [(int(best_i[j]), float(np.clip(best_d[j], 0.0, 2.0))) for j in order]


def _not_found(path: Path) -> str:
    if not path.exists():
        return f"{path}: no such index; build it with wsi-embed index OUT --encoder NAME (it prints the path)"
    if path.is_dir():
        found = sorted(p.name for p in path.glob("index-*") if (p / MANIFEST).is_file())
        if found:
            return f"{path}: an output folder, not an index; give one of its indexes: " + \
                   ", ".join(str(path / f) for f in found)
    return f"{path}: not a search index (no {MANIFEST}); build one with wsi-embed index OUT --encoder NAME"


def open_index(path: str | os.PathLike) -> SearchIndex:
    """Open an index folder (``<OUT>/index-<encoder>``) for queries."""
    return SearchIndex(path)
