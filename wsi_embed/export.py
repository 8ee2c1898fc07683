"""Exports of finished stores in the layouts other MIL tools read: TRIDENT, CLAM and STAMP.

Each writer follows its project's own code (dataset names, dtypes, chunking, and which object each
attr sits on):

- **TRIDENT** (``trident/IO.py: coords_to_h5, save_h5``; ``trident/wsi_objects/WSI.py:
  extract_tissue_coords, extract_patch_features``)::

    <to>/patches/<slide>_patches.h5     coords (N, 2) int64 level-0 x, y; attrs on coords: patch_size,
                                        patch_size_level0, level0_magnification, target_magnification,
                                        overlap, name, savetodir, level0_width, level0_height
    <to>/features_<encoder>/<slide>.h5  features (N, D) float32, attrs name, savetodir, encoder;
                                        coords (N, 2) int64 with the attrs above

  Datasets are chunked ``(1, ...)`` with an unlimited first axis, as ``save_h5`` makes them.
- **CLAM** (``extract_features_fp.py``, ``utils/file_utils.py: save_hdf5``)::

    <to>/h5_files/<slide>.h5   features (N, D) float32, coords (N, 2) int32 level-0; no attrs
    <to>/pt_files/<slide>.pt   torch.save of the (N, D) float32 tensor

- **STAMP** (``src/stamp/preprocessing/__init__.py: extract_``)::

    <to>/<slide>.h5   feats (N, D) float16, coords (N, 2) float32 in µm (level-0 px x slide mpp);
                      file attrs extractor, unit="um", tile_size_um, tile_size_px, feat_type="tile"

  ``stamp_version`` and ``code_hash`` are left out: they describe STAMP's own code, and STAMP refuses
  a file whose ``stamp_version`` is newer than the installed STAMP.

Every file is written under a temporary name (``.<name>.tmp-<host>-<pid>-<hex>``, never ``*.h5``,
so no reader lists it) and renamed into place. Each h5 file also carries the root attr
``wsi_embed_source``: a digest of the store's attrs and the encoder's attrs (and of this writer's
schema). A file whose digest matches the store is complete and current, so a rerun skips it; the
file that is written last for a slide (TRIDENT features, CLAM h5) is the one checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import __version__
from .errors import InvalidOption, WsiEmbedError
from .atomic import TMP_MARK, owner_gone, write_atomic
from .store import completed_encoders, enclosing_store, existing_output_folder, group_name, open_store, store_slide_id
from .verify import find_stores, verify_store

log = logging.getLogger(__name__)

FORMATS = ("trident", "clam", "stamp")
# bump when a writer's output changes: files written by an older writer are then redone
EXPORT_SCHEMA = 1
SOURCE_ATTR = "wsi_embed_source"


# -- geometry ---------------------------------------------------------------------------------------
def trident_magnification(mpp: float) -> int | float:
    """A slide's level-0 magnification as TRIDENT derives it from mpp (``WSI._fetch_magnification``):
    buckets, not 10 / mpp. TRIDENT refuses mpp >= 2.4; there we give 10 / mpp instead."""
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return mag
    return _tidy(10.0 / mpp)


def target_magnification(target_mpp: float) -> int | float:
    """TRIDENT's target magnification for a target resolution: pixel size = 10 / magnification
    (``WSIPatcher``), so 0.5 µm/px is 20x."""
    return _tidy(10.0 / target_mpp)


def _tidy(value: float) -> int | float:
    return int(round(value)) if abs(value - round(value)) < 1e-6 else round(value, 6)


def safe_name(encoder: str) -> str:
    """File-name-safe encoder name (the store's group name): ``timm:test_vit`` -> ``timm-test_vit``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", group_name(encoder))


# -- results ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    slide_id: str
    status: str  # "exported", "skipped" or "failed"
    path: Path | None = None  # the slide's main file (TRIDENT features, CLAM h5, STAMP h5)
    files: tuple[Path, ...] = ()
    note: str = ""
    error: str | None = None

    def line(self) -> str:
        if self.status == "failed":
            return f"error: {self.error}"
        if self.status == "skipped":
            return f"skipped {self.slide_id}: {self.note}"
        return f"exported {self.slide_id} -> {self.path}"


@dataclass
class ExportSummary:
    format: str
    to: Path
    results: list[ExportResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("failed") else 0

    def line(self) -> str:
        return (f"{len(self.results)} slides: {self.count('exported')} exported, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed in {self.seconds:.1f} s; {self.format} files in {self.to}")


# -- atomic files -----------------------------------------------------------------------------------
def _atomic_h5(path: Path, fill: Callable, source: str) -> Path:
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            fill(f)
            f.attrs[SOURCE_ATTR] = source
            f.attrs["wsi_embed_version"] = __version__

    return write_atomic(path, write)


def _atomic_pt(path: Path, features: np.ndarray) -> Path:
    import torch

    return write_atomic(path, lambda tmp: torch.save(torch.from_numpy(features), tmp))


def _current(path: Path, source: str) -> bool:
    """``path`` is a complete file written from this very store and encoder."""
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get(SOURCE_ATTR) == source
    except (OSError, ValueError) as exc:  # truncated or not HDF5: write it again
        log.info("%s: not a readable h5 file (%r); writing it again", path, exc)
        return False


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries of exports whose process has ended (on this host)."""
    removed = []
    if directory.is_dir():
        for path in directory.glob(f".*{TMP_MARK}*"):
            if path.is_file() and owner_gone(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _save_h5(f, assets: dict[str, np.ndarray], attributes: dict[str, dict], chunk_rows: int) -> None:
    """Datasets as TRIDENT's ``save_h5`` / CLAM's ``save_hdf5`` create them: chunks of ``chunk_rows``
    rows, unlimited first axis; attrs on the dataset they describe."""
    for key, val in assets.items():
        dset = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                chunks=(chunk_rows,) + val.shape[1:], dtype=val.dtype)
        dset[:] = val
        for attr_key, attr_val in attributes.get(key, {}).items():
            dset.attrs[attr_key] = "None" if attr_val is None else attr_val  # as save_h5 writes None


def _digest(*parts) -> str:
    text = json.dumps([EXPORT_SCHEMA, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# -- one slide, one format --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slide:
    slide_id: str
    store: Path
    encoder: str  # the store's encoder name
    attrs: dict
    encoder_attrs: dict

    @property
    def grid(self) -> dict:
        return self.attrs["grid"]


class _Writer:
    """One format: the files a slide becomes, whether they are current, and how to write them."""

    writes_empty = True  # whether a slide without embedded cells gets (empty) files

    def __init__(self, to: Path, encoder: str):
        self.to, self.encoder = to, encoder

    def dirs(self) -> list[Path]:
        raise NotImplementedError

    def current(self, s: _Slide) -> Path | None:
        """The slide's main file when every file of the slide is complete and current."""
        raise NotImplementedError

    def write(self, s: _Slide, features: np.ndarray, xy: np.ndarray) -> tuple[Path, ...]:
        raise NotImplementedError


class TridentWriter(_Writer):
    def dirs(self) -> list[Path]:
        return [self.to / "patches", self.features_dir]

    @property
    def features_dir(self) -> Path:
        return self.to / f"features_{safe_name(self.encoder)}"

    def _paths(self, s: _Slide) -> tuple[Path, Path]:
        return self.to / "patches" / f"{s.slide_id}_patches.h5", self.features_dir / f"{s.slide_id}.h5"

    @staticmethod
    def _sources(s: _Slide) -> tuple[str, str]:
        return _digest("trident-patches", s.attrs), _digest("trident-features", s.attrs, s.encoder_attrs)

    def current(self, s: _Slide) -> Path | None:
        (patches, feats), (p_src, f_src) = self._paths(s), self._sources(s)
        return feats if _current(patches, p_src) and _current(feats, f_src) else None

    def coords_attrs(self, s: _Slide) -> dict:
        grid, slide = s.grid, s.attrs["slide"]
        width, height = slide["dimensions"]
        return {
            "patch_size": int(grid["patch_px"]),  # at the target magnification
            # the cell's true side in level-0 px; TRIDENT's patch_size * level0 mag // target mag
            # where the scan's mpp is the nominal one (0.25 µm/px at 40x)
            "patch_size_level0": int(round(grid["cell_size0"])),
            "level0_magnification": trident_magnification(float(grid["slide_mpp"])),
            "target_magnification": target_magnification(float(grid["target_mpp"])),
            "overlap": int(grid["patch_px"]) - int(grid["stride_px"]),  # target px, as TRIDENT's --overlap
            "name": s.slide_id,
            "savetodir": str(self.to),
            "level0_width": int(width),
            "level0_height": int(height),
        }

    def write(self, s: _Slide, features: np.ndarray, xy: np.ndarray) -> tuple[Path, ...]:
        patches, feats = self._paths(s)
        p_src, f_src = self._sources(s)
        coords = np.ascontiguousarray(xy, dtype=np.int64)
        cattrs = self.coords_attrs(s)
        if not _current(patches, p_src):
            _atomic_h5(patches, lambda f: _save_h5(f, {"coords": coords}, {"coords": cattrs}, 1), p_src)
        fattrs = {"name": s.slide_id, "savetodir": str(self.features_dir), "encoder": s.encoder}
        _atomic_h5(feats, lambda f: _save_h5(f, {"features": features.astype(np.float32, copy=False),
                                                 "coords": coords},
                                             {"features": fattrs, "coords": cattrs}, 1), f_src)
        return feats, patches


class ClamWriter(_Writer):
    def dirs(self) -> list[Path]:
        return [self.to / "h5_files", self.to / "pt_files"]

    def _paths(self, s: _Slide) -> tuple[Path, Path]:
        return self.to / "h5_files" / f"{s.slide_id}.h5", self.to / "pt_files" / f"{s.slide_id}.pt"

    def current(self, s: _Slide) -> Path | None:
        h5, pt = self._paths(s)
        return h5 if pt.is_file() and _current(h5, _digest("clam", s.attrs, s.encoder_attrs)) else None

    def write(self, s: _Slide, features: np.ndarray, xy: np.ndarray) -> tuple[Path, ...]:
        h5, pt = self._paths(s)
        features = np.ascontiguousarray(features, dtype=np.float32)
        coords = xy.astype(np.int32)  # extract_features_fp.py: coord.numpy().astype(np.int32)
        _atomic_pt(pt, features)  # first: the h5, written last, says the pair is complete
        _atomic_h5(h5, lambda f: _save_h5(f, {"features": features, "coords": coords}, {}, 32),
                   _digest("clam", s.attrs, s.encoder_attrs))
        return h5, pt


class StampWriter(_Writer):
    writes_empty = False  # STAMP's extract_ writes no file for a slide without tiles ("no tiles found")

    def dirs(self) -> list[Path]:
        return [self.to]

    def _path(self, s: _Slide) -> Path:
        return self.to / f"{s.slide_id}.h5"

    def current(self, s: _Slide) -> Path | None:
        path = self._path(s)
        return path if _current(path, _digest("stamp", s.attrs, s.encoder_attrs)) else None

    def write(self, s: _Slide, features: np.ndarray, xy: np.ndarray) -> tuple[Path, ...]:
        grid = s.grid
        # STAMP: coordinates of the top-left corner in µm, level-0 px x slide mpp, float32
        coords_um = (xy.astype(np.float64) * float(grid["slide_mpp"])).astype(np.float32)

        def fill(f) -> None:
            f["coords"] = coords_um
            f["feats"] = features.astype(np.float16)
            f.attrs["extractor"] = s.encoder
            f.attrs["unit"] = "um"
            f.attrs["tile_size_um"] = float(grid["patch_px"]) * float(grid["target_mpp"])
            f.attrs["tile_size_px"] = int(grid["patch_px"])
            f.attrs["feat_type"] = "tile"

        path = self._path(s)
        _atomic_h5(path, fill, _digest("stamp", s.attrs, s.encoder_attrs))
        return (path,)


WRITERS: dict[str, type[_Writer]] = {"trident": TridentWriter, "clam": ClamWriter, "stamp": StampWriter}


# -- the cohort -------------------------------------------------------------------------------------
def resolve_encoder(stores: list[Path], encoder: str) -> str:
    """The store encoder name ``encoder`` means: the model name (``timm:test_vit``) or its group name
    (``timm-test_vit``). Raises :class:`InvalidOption` when no store holds it."""
    seen: set[str] = set()
    for store in stores:
        for name in completed_encoders(store):
            if encoder in (name, group_name(name)):
                return name
            seen.add(name)
    if any((store / group_name(encoder)).is_dir() for store in stores):
        return encoder  # only incomplete groups: each store says so
    found = ", ".join(sorted(seen)) or "none"
    raise InvalidOption(f"{encoder!r}: no store holds this encoder (complete encoders: {found}); check --encoder")


def export_stores(out: str | os.PathLike, *, format: str, encoder: str, to: str | os.PathLike
                  ) -> Iterator[ExportResult]:
    """Export every complete store in ``out`` holding ``encoder`` to ``to`` in ``format`` (trident,
    clam or stamp), one :class:`ExportResult` per store as it is done. Options are checked at once
    (:class:`WsiEmbedError` for an unknown format, a missing ``out``, an encoder no store holds);
    a store that is incomplete, lacks the encoder or is damaged gives a ``failed`` result and the
    others go on. Current files are skipped; stale temporaries of ended exports are removed."""
    fmt = format.lower()
    if fmt not in WRITERS:
        raise InvalidOption(f"--format {format!r}: unknown export format; choose one of {', '.join(FORMATS)}")
    out = existing_output_folder(out, store_ok=True)
    stores = find_stores(out)
    name = resolve_encoder(stores, encoder)
    to = Path(to)
    inside = enclosing_store(to)
    if inside is not None:  # files written there would damage the store
        raise InvalidOption(f"{to}: {'is' if inside == to.absolute() else 'is inside'} the store {inside}; "
                            "choose a --to outside the stores")
    writer = WRITERS[fmt](to, name)
    try:
        for d in writer.dirs():
            d.mkdir(parents=True, exist_ok=True)
            for path in remove_stale_temporaries(d):
                log.info("removed %s, left by an export that ended", path)
    except OSError as exc:
        raise InvalidOption(f"{to}: cannot be written ({exc.strerror or exc}); choose another --to") from exc
    return _export_each(stores, writer, name)


def _export_each(stores: list[Path], writer: _Writer, encoder: str) -> Iterator[ExportResult]:
    for store in stores:
        slide_id = store_slide_id(store)
        yield export_one(store, slide_id, writer, encoder)


def export_one(store: Path, slide_id: str, writer: _Writer, encoder: str) -> ExportResult:
    try:
        opened = open_store(store)
        s = _Slide(slide_id, store, encoder, opened.attrs, opened.encoder_attrs(encoder))  # group missing: rerun embed
        try:
            done = writer.current(s)
        except (KeyError, TypeError, ValueError):  # attrs damaged: verify says how, below
            done = None
        if done is not None:  # files written from this very store: nothing is read again
            return ExportResult(slide_id, "skipped", done, note=f"up to date at {done}")
        report = verify_store(store, groups=[group_name(encoder)])
        if not report.ok:  # what verify calls damaged is not exported, whatever part the format reads
            return ExportResult(slide_id, "failed", error=report.error_line())
        features, xy = opened.bag(encoder)
        if not len(xy) and not writer.writes_empty:
            return ExportResult(slide_id, "skipped", note="no embedded cells; this format has no file for it")
        files = writer.write(s, features, xy)
    except WsiEmbedError as exc:
        return ExportResult(slide_id, "failed", error=str(exc))
    except OSError as exc:  # full disk, permissions: this slide fails, the others go on
        where = exc.filename or writer.to
        return ExportResult(slide_id, "failed",
                            error=f"{where}: cannot be written ({exc.strerror or exc}); check space and permissions")
    log.info("%s: %d cells exported to %s", slide_id, len(xy), ", ".join(map(str, files)))
    return ExportResult(slide_id, "exported", files[0], files)


def export(out: str | os.PathLike, *, format: str, encoder: str, to: str | os.PathLike,
           on_result: Callable[[ExportResult], None] | None = None) -> ExportSummary:
    """Run :func:`export_stores` to the end; ``on_result`` sees each result as it comes."""
    start = time.perf_counter()
    summary = ExportSummary(format.lower(), Path(to))
    for result in export_stores(out, format=format, encoder=encoder, to=to):
        summary.results.append(result)
        if on_result is not None:
            on_result(result)
    summary.seconds = time.perf_counter() - start
    return summary
