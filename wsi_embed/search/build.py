"""Build ``<OUT>/index-<encoder>/`` from the complete stores of an output folder.

Layout (every file written in a temporary folder beside it, renamed into place when complete)::

    index-<encoder>/
      index.json          manifest: encoder, dim, metric, kind, counts, slides (with fingerprints), skipped
      slide_vectors.npy   (S, D) float32   mean of each slide's embeddings, L2-normalised
      patch_table.npy     (N, 5) int64     slide (row of index.json "slides"), row, col, level-0 x, y
      patch_vectors.npy   (N, D) float32   L2-normalised embeddings            (kind "exact")
      patches.usearch     usearch HNSW index, cosine, keys = patch_table rows  (kind "usearch")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CorruptStore, EncoderMismatch, WsiEmbedError
from ..atomic import swap_in_dir, tmp_suffix
from ..store import existing_output_folder, group_name, is_temporary, open_store, store_slide_id
from ..verify import verify_store

log = logging.getLogger(__name__)

# Up to this many patches the patch index is an exact search over a float32 matrix (one query reads
# N x D floats: 200k x 384 is 0.3 GB, well under a second); above it, a usearch HNSW graph.
EXACT_MAX_PATCHES = 200_000
FORMAT, FORMAT_VERSION = "wsi-embed-index", 1
MANIFEST = "index.json"
SLIDE_VECTORS = "slide_vectors.npy"
PATCH_TABLE = "patch_table.npy"
PATCH_VECTORS = "patch_vectors.npy"
PATCH_USEARCH = "patches.usearch"
TABLE_COLUMNS = ["slide", "row", "col", "x", "y"]
METRIC = "cosine"
DISTANCE = "cosine distance, 1 - cos(a, b) of the L2-normalised embeddings: 0 same direction, 2 opposite"


def index_dir(out_dir: str | os.PathLike, encoder: str) -> Path:
    """Where :func:`build_index` writes the index of ``encoder`` (model or group name)."""
    return Path(out_dir) / f"index-{group_name(encoder)}"


@dataclass
class _Member:
    """One store that goes into the index."""

    store: Path
    slide_id: str
    encoder: str  # the model name recorded in the group
    cells: int
    enc: dict  # the group's encoder attrs
    grid: dict
    slide: dict

    def key(self) -> tuple:
        """Stores that may share an index: same dim, weights and grid."""
        return (int(self.enc.get("dim", 0)), bool(self.enc.get("weights_random")), self.enc.get("weights_sha256"),
                float(self.grid.get("target_mpp", 0.0)), int(self.grid.get("patch_px", 0)))


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def store_fingerprint(store: Path, node: str) -> str:
    """sha256 of the store's root, encoder group and embeddings metadata: it changes when the store is
    rebuilt from another slide file, grid or weights."""
    h = hashlib.sha256()
    for rel in ("zarr.json", f"{node}/zarr.json", f"{node}/embeddings/zarr.json"):
        h.update((store / rel).read_bytes())
    return h.hexdigest()


def _find_members(out_dir: Path, encoder: str) -> tuple[list[_Member], list[dict]]:
    wanted = group_name(encoder)
    members, skipped = [], []
    stores = sorted(p for p in out_dir.iterdir()
                    if p.name.endswith(".zarr") and p.is_dir() and not p.name.startswith(".")
                    and not is_temporary(p.name))
    for path in stores:
        try:
            store = open_store(path)
            names = [n for n in store.encoders if group_name(n) == wanted]
            if not names:
                skipped.append({"store": path.name, "reason": f"no complete {encoder} group"})
                continue
            report = verify_store(path, groups=[wanted])  # reads every chunk: damage the metadata hides
            if not report.ok:
                skipped.append({"store": path.name, "reason": report.error_line()})
                continue
            enc = store.encoder_attrs(names[0])
            attrs = store.attrs
            cells = int(store.mask.sum())
        except (WsiEmbedError, OSError) as exc:
            skipped.append({"store": path.name, "reason": str(exc)})
            continue
        if cells == 0:
            skipped.append({"store": path.name, "reason": "no embedded cells"})
            continue
        slide = attrs.get("slide", {})
        members.append(_Member(path, slide.get("slide_id") or store_slide_id(path), names[0], cells, enc,
                               attrs.get("grid", {}), slide))
    return members, skipped


def _nothing_to_index(out_dir: Path, encoder: str, skipped: list[dict]) -> str:
    if not skipped:
        return f"{out_dir}: no *.zarr stores in it; give the folder passed to wsi-embed embed --out"
    if all(s["reason"] == f"no complete {encoder} group" for s in skipped):
        return (f"{out_dir}: none of its {len(skipped)} stores has a complete {encoder!r} group; "
                f"embed with wsi-embed embed --model {encoder}, or name an encoder the stores hold")
    shown = "; ".join(f"{s['store']} ({s['reason']})" for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"{out_dir}: none of its {len(skipped)} stores can be indexed for {encoder!r}: {shown}{more}"


def _agreeing(members: list[_Member], skipped: list[dict]) -> list[_Member]:
    """The stores made with the weights and grid most stores share; the others are skipped (one
    index mixes neither weights nor resolutions)."""
    if not members:
        return members
    counts = Counter(m.key() for m in members)
    best = counts.most_common(1)[0][0]  # ties: the first store's (most_common is stable)
    dim, random, sha, mpp, patch = best
    weights = "random weights" if random else f"weights sha256 {str(sha)[:12]}"
    for m in members:
        if m.key() != best:
            d, r, s, mp, p = m.key()
            theirs = "random weights" if r else f"weights sha256 {str(s)[:12]}"
            skipped.append({"store": m.store.name, "reason": (
                f"made with dim {d}, {theirs}, {p} px at {mp:g} µm/px, unlike the {counts[best]} other stores "
                f"(dim {dim}, {weights}, {patch} px at {mpp:g} µm/px); re-embed it or index it apart")})
    return [m for m in members if m.key() == best]


def build_index(out_dir: str | os.PathLike, encoder: str, *, exact_max: int = EXACT_MAX_PATCHES) -> Path:
    """Index the complete stores of ``out_dir`` for ``encoder`` (``timm:test_vit`` or its group name
    ``timm-test_vit``) into ``<out_dir>/index-<group>/`` and return that path. A slide index (mean-pooled,
    L2-normalised, one row per slide) and a patch index over every embedded cell: exact when it
    holds at most ``exact_max`` patches, usearch HNSW above. Stores without a complete group of the
    encoder, or made with other weights or another grid, are skipped and named in a log line. An
    existing index is replaced only once the new one is complete."""
    out_dir = existing_output_folder(out_dir)
    started = time.perf_counter()
    members, skipped = _find_members(out_dir, encoder)
    members = _agreeing(members, skipped)
    if not members:
        raise EncoderMismatch(_nothing_to_index(out_dir, encoder, skipped))
    if skipped:
        log.warning("%s: %d store(s) skipped: %s", out_dir, len(skipped),
                    "; ".join(f"{s['store']} ({s['reason']})" for s in skipped))
    final = index_dir(out_dir, members[0].encoder)
    tmp = final.with_name(f".{final.name}{tmp_suffix()}")
    tmp.mkdir()
    try:
        manifest = _write(tmp, members, skipped, exact_max)
        manifest["seconds"] = round(time.perf_counter() - started, 3)
        data = json.dumps(manifest, indent=1).encode()
        (tmp / MANIFEST).write_bytes(data)  # last: a folder with index.json is complete
        swap_in_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: %d slides, %d patches (%s) in %.1f s", final, manifest["counts"]["slides"],
             manifest["counts"]["patches"], manifest["kind"], manifest["seconds"])
    return final


def _write(folder: Path, members: list[_Member], skipped: list[dict], exact_max: int) -> dict:
    """Fill ``folder`` one store at a time: memory is one slide's bag plus the index being built."""
    dim = int(members[0].enc["dim"])
    n = sum(m.cells for m in members)
    kind = "exact" if n <= exact_max else "usearch"
    table = np.lib.format.open_memmap(folder / PATCH_TABLE, mode="w+", dtype=np.int64, shape=(n, 5))
    slide_vectors = np.zeros((len(members), dim), np.float32)
    if kind == "exact":
        vectors = np.lib.format.open_memmap(folder / PATCH_VECTORS, mode="w+", dtype=np.float32, shape=(n, dim))
    else:
        from usearch.index import Index

        ann = Index(ndim=dim, metric="cos", dtype="f32")
    slides, k = [], 0
    for m in members:
        store = open_store(m.store)
        try:
            feats, xy = store.bag(m.encoder)  # reads every chunk: damage the metadata did not show
        except CorruptStore as exc:
            skipped.append({"store": m.store.name, "reason": str(exc)})
            log.warning("%s: skipped: %s", m.store.name, exc)
            continue
        rows, cols = np.nonzero(store.mask)  # bag order is row-major, as np.nonzero's
        if feats.shape[1] != dim:  # stores agree on weights, so this is another model under that name
            skipped.append({"store": m.store.name, "reason": f"{m.encoder} embeddings have dim {feats.shape[1]}, "
                            f"the other stores' {dim}"})
            log.warning("%s: skipped: %s", m.store.name, skipped[-1]["reason"])
            continue
        c, i = len(feats), len(slides)
        slide_vectors[i] = _normalise(feats.mean(axis=0, dtype=np.float64))
        table[k : k + c] = np.column_stack([np.full(c, i), rows, cols, xy[:, 0], xy[:, 1]])
        unit = _normalise(feats)
        if kind == "exact":
            vectors[k : k + c] = unit
        else:
            ann.add(np.arange(k, k + c, dtype=np.uint64), unit)
        mpp = float(m.grid.get("target_mpp", 0.0))
        slides.append({
            "slide_id": m.slide_id, "store": m.store.name, "slide_path": m.slide.get("path"),
            "slide_fingerprint": m.slide.get("fingerprint"),
            "store_fingerprint": store_fingerprint(m.store, group_name(m.encoder)),
            "first": k, "cells": c, "rows": int(store.mask.shape[0]), "cols": int(store.mask.shape[1]),
            "level": int(m.grid.get("level", 0)), "read_px": int(m.grid.get("read_px", 0)),
            "cell_size0": float(m.grid.get("cell_size0", 0.0)), "target_mpp": mpp,
        })
        k += c
    if not slides:
        raise CorruptStore(f"{folder.parent}: every store holding {members[0].encoder} is damaged; "
                           f"check them with: wsi-embed verify {folder.parent} --repair")
    table.flush()
    if kind == "exact":
        vectors.flush()
        del vectors
    else:
        ann.save(str(folder / PATCH_USEARCH))
    del table
    if k < n:  # a store was skipped above: drop the rows reserved for it
        for name in (PATCH_TABLE, PATCH_VECTORS) if kind == "exact" else (PATCH_TABLE,):
            kept = np.load(folder / name, mmap_mode="r")[:k].copy()
            np.save(folder / name, kept)
    np.save(folder / SLIDE_VECTORS, slide_vectors[: len(slides)])
    enc = {key: value for key, value in members[0].enc.items() if key not in ("decoder", "decoders", "fallback")}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "wsi_embed_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "encoder": members[0].encoder, "group": group_name(members[0].encoder), "dim": dim,
        "metric": METRIC, "distance": DISTANCE, "kind": kind, "exact_max_patches": exact_max,
        "counts": {"slides": len(slides), "patches": k, "skipped": len(skipped)},
        "grid": {"target_mpp": float(members[0].grid.get("target_mpp", 0.0)),
                 "patch_px": int(members[0].grid.get("patch_px", 0))},
        "encoder_attrs": enc,
        "files": {"slide_vectors": SLIDE_VECTORS, "patch_table": PATCH_TABLE,
                  "patch_vectors": PATCH_VECTORS if kind == "exact" else None,
                  "usearch": PATCH_USEARCH if kind == "usearch" else None},
        "table_columns": TABLE_COLUMNS,
        "slides": slides, "skipped": skipped,
    }
