"""Check finished stores for damage, and re-embed what is damaged (``wsi-embed verify [--repair]``).

:func:`verify_store` reads every chunk of a store, one batch of whole chunks at a time (memory does
not grow with the slide), and checks:

- metadata: the root (slide, grid, tissue attrs), the geometry arrays, every encoder group and its
  embeddings array can be read and have the shapes the grid says;
- checksums: every chunk decodes (stores written with the ``crc32c`` codec fail a changed chunk);
  geometry chunks of such stores are all written, so a missing one is damage too;
- values: coords are the grid's, the mask is the cells at or above ``min_tissue`` and holds
  ``tissue.cells_embedded`` cells, every mask cell has a finite embedding and every other cell is
  NaN, and a group's ``cells`` count (when recorded) equals the mask's.

The :class:`StoreReport` says which parts are damaged: the geometry, or which encoder groups.
:func:`repair_store` re-embeds only those: a damaged group alone (the others and the geometry are
kept), or, when the geometry is damaged, the whole store with all of its encoders.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import zarr

from .errors import WsiEmbedError
from .atomic import TMP_MARK, owner_gone
from .store import (GEOMETRY_ARRAYS, OPTIONAL_ARRAYS, _read_array, _read_group, _remove, damage_reason,
                    expected_optional_arrays, group_dirs, has_checksums, is_temporary, refuse_inside_a_store,
                    refuse_a_temporary_store, remove_dead_temporaries,
                    repair_backup_path, repair_hint, settle_repair_backup, settle_zarr_reads, store_of_backup,
                    store_slide_id)

log = logging.getLogger(__name__)

GEOMETRY = "geometry"
_READ_BUDGET = 32 << 20  # bytes decoded per read: a few whole chunks at a time
_MAX_LISTED = 3  # chunk keys named in one problem


@dataclass(frozen=True)
class Problem:
    part: str  # "geometry", or the encoder's name (its group's node name when the name is unreadable)
    node: str  # the store node: "mask", "timm-foo/embeddings", "zarr.json" ...
    what: str

    def __str__(self) -> str:
        return f"{self.node}: {self.what}"


@dataclass
class StoreReport:
    """What :func:`verify_store` found in one store."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    encoders: dict[str, dict] = field(default_factory=dict)  # name -> encoder attrs, groups that could be read
    nodes: dict[str, str] = field(default_factory=dict)  # name -> group node
    unrepairable: list[str] = field(default_factory=list)  # why parts cannot be re-embedded automatically

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def geometry_damaged(self) -> bool:
        return any(p.part == GEOMETRY for p in self.problems)

    @property
    def damaged_encoders(self) -> list[str]:
        """Names of the encoder groups found damaged (not counting the geometry)."""
        return list(dict.fromkeys(p.part for p in self.problems if p.part != GEOMETRY))

    @property
    def damaged_parts(self) -> list[str]:
        return ([GEOMETRY] if self.geometry_damaged else []) + self.damaged_encoders

    def summary(self) -> str:
        """One line: each damaged part and what is wrong with it."""
        if self.ok:
            return "ok"
        parts = []
        for part in self.damaged_parts:
            label = GEOMETRY if part == GEOMETRY else f"encoder {part}"
            parts.append(f"{label} ({'; '.join(str(p) for p in self.problems if p.part == part)})")
        return ", ".join(parts)

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.path}"
        # what --repair cannot fix is said here, where the summary line points
        return f"damaged  {self.path}: {self.summary()}" + (f"; {self.fix()}" if self.unrepairable else "")

    def fix(self) -> str:
        """What to do about the damage."""
        return (f"it cannot be repaired automatically ({'; '.join(self.unrepairable)})" if self.unrepairable
                else repair_hint(self.path))

    def error_line(self) -> str:
        """The message of :class:`~wsi_embed.errors.CorruptStore` for this store."""
        return f"{self.path}: damaged: {self.summary()}; {self.fix()}"

    def to_dict(self) -> dict:
        return {"store": str(self.path), "ok": self.ok, "damaged": self.damaged_parts,
                "geometry_damaged": self.geometry_damaged, "damaged_encoders": self.damaged_encoders,
                "problems": [{"part": p.part, "node": p.node, "what": p.what} for p in self.problems],
                "encoders": sorted(self.encoders), "unrepairable": self.unrepairable}


# -- reading chunk by chunk ----------------------------------------------------------------------
def _regions(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int) -> Iterator[tuple[slice, ...]]:
    """Whole-chunk regions over the first two axes (all of the others), each about the read budget."""
    lead = shape[:2] if len(shape) >= 2 else shape
    ck = chunks[: len(lead)]
    per_chunk = itemsize * int(np.prod(chunks))
    if len(lead) == 1:
        step = max(1, _READ_BUDGET // max(1, per_chunk)) * ck[0]
        for a in range(0, lead[0], step):
            yield (slice(a, a + step),)
        return
    across = max(1, _READ_BUDGET // max(1, per_chunk)) * ck[1]  # chunks side by side in one read
    for r in range(0, lead[0], ck[0]):
        for c in range(0, lead[1], across):
            yield slice(r, r + ck[0]), slice(c, c + across)


def _chunks_in(region: tuple[slice, ...], shape: tuple[int, ...], chunks: tuple[int, ...]):
    ranges = []
    for i, s in enumerate(region):
        stop = min(s.stop, shape[i])
        ranges.append(range(s.start // chunks[i], -(-stop // chunks[i])))
    for idx in product(*ranges):
        yield idx, tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))


def _key(idx: tuple[int, ...], ndim: int) -> str:
    return "c/" + "/".join(str(i) for i in idx + (0,) * (ndim - len(idx)))


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _scan(array: zarr.Array, visit: Callable[[tuple[slice, ...], np.ndarray], None]) -> dict[str, list[str]]:
    """Read every chunk of ``array`` (a few at a time), calling ``visit(region, data)``; returns the
    chunks that could not be read, grouped by reason."""
    failed: dict[str, list[str]] = {}
    shape, chunks = tuple(array.shape), tuple(array.chunks)
    if 0 in shape:
        return failed
    for region in _regions(shape, chunks, array.dtype.itemsize):
        try:
            data = array[region]
        except Exception:  # noqa: BLE001 - find which chunks of this region fail, one by one
            settle_zarr_reads()
            for idx, one in _chunks_in(region, shape, chunks[: len(region)]):
                try:
                    piece = array[one]
                except Exception as exc:  # noqa: BLE001 - a damaged chunk is what we look for
                    settle_zarr_reads()
                    failed.setdefault(damage_reason(exc), []).append(_key(idx, array.ndim))
                else:
                    visit(one, piece)
            continue
        visit(region, data)
    return failed


def _chunk_problems(part: str, node: str, failed: dict[str, list[str]]) -> list[Problem]:
    out = []
    for reason, keys in failed.items():
        reason = reason[len("a chunk "):] if reason.startswith("a chunk ") else reason
        out.append(Problem(part, node, f"chunk {keys[0]} {reason}" if len(keys) == 1
                           else f"{len(keys)} chunks ({_listed(keys)}): each {reason}"))
    return out


def _missing_chunks(array: zarr.Array) -> int:
    """Chunk files missing from an array all of whose chunks were written (geometry with checksums)."""
    if not has_checksums(array):
        return 0  # older stores skipped chunks equal to the fill value: absence proves nothing
    return max(0, int(array.nchunks) - int(array.nchunks_initialized))


# -- the checks ------------------------------------------------------------------------------------
class _Geometry:
    """Reads and checks the root attrs and the geometry arrays; keeps the mask (one byte per cell)."""

    def __init__(self, path: Path, report: StoreReport):
        self.path, self.report = path, report
        self.attrs: dict | None = None
        self.mask: np.ndarray | None = None
        self.rows = self.cols = None

    def problem(self, node: str, what: str) -> None:
        self.report.problems.append(Problem(GEOMETRY, node, what))

    def check(self) -> None:
        if not self._root():
            return
        arrays = {}
        for name in GEOMETRY_ARRAYS:
            try:
                arrays[name] = _read_array(self.path / name)
            except Exception as exc:  # noqa: BLE001 - damaged metadata is a finding
                self.problem(name, damage_reason(exc) if (self.path / name).exists() else "missing")
        for name, array in arrays.items():
            missing = _missing_chunks(array)
            if missing:
                self.problem(name, f"{missing} of {array.nchunks} chunk files are missing")
        self._cells(arrays)
        self._pictures(arrays)
        self._optional()

    def _optional(self) -> None:
        """Optional arrays (ink, annotation labels, artefact measures; older stores lack them): those
        the tissue attrs say were written are there, their chunks decode and their shapes are the
        grid's (ink_mask: the tissue mask's)."""
        tissue = self.attrs.get("tissue") or {}
        expected = expected_optional_arrays(tissue)
        for name in OPTIONAL_ARRAYS:
            if not (self.path / name).exists():
                if name in expected:
                    self.problem(name, "missing (the store's tissue attrs say it was written)")
                continue
            try:
                array = _read_array(self.path / name)
            except Exception as exc:  # noqa: BLE001 - damaged metadata is a finding
                self.problem(name, damage_reason(exc))
                continue
            try:
                want = (tuple(_read_array(self.path / "tissue_mask").shape) if name == "ink_mask"
                        else (self.rows, self.cols))
            except Exception:  # noqa: BLE001 - tissue_mask's own damage is reported already
                want = tuple(array.shape)
            if tuple(array.shape) != want:
                self.problem(name, f"shape {tuple(array.shape)}, expected {want}")
            missing = _missing_chunks(array)
            if missing:
                self.problem(name, f"{missing} of {array.nchunks} chunk files are missing")
            self.report.problems += _chunk_problems(GEOMETRY, name, _scan(array, lambda r, d: None))

    def _root(self) -> bool:
        try:
            _, attrs = _read_group(self.path)
        except Exception as exc:  # noqa: BLE001
            there = (self.path / "zarr.json").exists()
            self.problem("zarr.json", f"root metadata unreadable: {damage_reason(exc)}" if there
                         else "root metadata missing")
            self.report.unrepairable.append("its root metadata, which names the slide and the grid options, is lost; "
                                            "re-embed the slide with wsi-embed embed SLIDE --out "
                                            f"{self.path.parent} --overwrite and its options")
            return False
        missing = [k for k in ("wsi_embed", "slide", "grid", "tissue") if not isinstance(attrs.get(k), dict)]
        if missing:
            self.problem("zarr.json", f"root attrs {', '.join(missing)} missing")
            self.report.unrepairable.append("its root attrs, which name the slide and the grid options, are incomplete; "
                                            "re-embed the slide with wsi-embed embed SLIDE --out "
                                            f"{self.path.parent} --overwrite and its options")
            return False
        grid = attrs["grid"]
        try:
            self.rows, self.cols = int(grid["rows"]), int(grid["cols"])
        except (KeyError, TypeError, ValueError):
            self.problem("zarr.json", "grid attrs unreadable")
            self.report.unrepairable.append("its grid attrs are lost; re-embed the slide with wsi-embed embed SLIDE "
                                            f"--out {self.path.parent} --overwrite and its options")
            return False
        self.attrs = attrs
        return True

    def _expected_coords(self) -> tuple[np.ndarray, np.ndarray] | None:
        g = self.attrs["grid"]
        try:
            ds, stride = float(g["level_downsample"]), float(g["stride_level_px"])
            ox, oy = (int(v) for v in g["origin_level"])
        except (KeyError, TypeError, ValueError):
            return None
        xs = np.round((ox + np.round(np.arange(self.cols) * stride).astype(np.int64)) * ds).astype(np.int64)
        ys = np.round((oy + np.round(np.arange(self.rows) * stride).astype(np.int64)) * ds).astype(np.int64)
        return xs, ys

    def _read_whole(self, arrays: dict, name: str, shape: tuple[int, int], dtype) -> np.ndarray | None:
        """A geometry array read chunk by chunk; None when it is missing or any chunk is damaged."""
        if name not in arrays:
            return None
        out = np.zeros(shape, dtype=dtype)

        def keep(region, data):
            out[region] = data

        failed = _scan(arrays[name], keep)
        self.report.problems += _chunk_problems(GEOMETRY, name, failed)
        return None if failed else out

    def _cells(self, arrays: dict) -> None:
        rows, cols = self.rows, self.cols
        shapes_ok = True
        for name, shape in (("mask", (rows, cols)), ("tissue_fraction", (rows, cols)), ("coords", (rows, cols, 2))):
            if name in arrays and tuple(arrays[name].shape) != shape:
                self.problem(name, f"shape {tuple(arrays[name].shape)}, the grid says {shape}")
                shapes_ok = False
        if not shapes_ok:
            return
        mask = self._read_whole(arrays, "mask", (rows, cols), bool)
        fraction = self._read_whole(arrays, "tissue_fraction", (rows, cols), np.float32)
        if "coords" in arrays:
            expected = self._expected_coords()
            wrong = [0]

            def check_coords(region, data):
                if expected is not None:
                    rs, cs = region[0], region[1]
                    wrong[0] += int(((data[..., 0] != expected[0][cs][None, :])
                                     | (data[..., 1] != expected[1][rs][:, None])).sum())

            failed = _scan(arrays["coords"], check_coords)
            self.report.problems += _chunk_problems(GEOMETRY, "coords", failed)
            if wrong[0]:
                self.problem("coords", f"{wrong[0]} cells differ from the grid's coordinates")
        tissue = self.attrs["tissue"]
        if mask is not None:
            recorded = tissue.get("cells_embedded")
            if recorded is not None and int(recorded) != int(mask.sum()):
                self.problem("mask", f"{int(mask.sum())} cells, the store recorded {recorded}")
            if fraction is not None and tissue.get("min_tissue") is not None:
                enough = fraction >= float(tissue["min_tissue"])
                # cells may also be left out for ink, annotations, blank or blur: then a subset
                restricted = tissue.get("max_patches") or any((tissue.get("cells_excluded") or {}).values())
                bad = mask & ~enough if restricted else mask != enough
                if bad.any():
                    self.problem("mask", f"{int(bad.sum())} cells disagree with tissue_fraction >= "
                                         f"{tissue['min_tissue']:g}")
            if not any(p.part == GEOMETRY for p in self.report.problems):
                self.mask = mask

    def _pictures(self, arrays: dict) -> None:
        thumb, tmask = arrays.get("thumbnail"), arrays.get("tissue_mask")
        if thumb is not None:
            if thumb.ndim != 3 or thumb.shape[2] != 3:
                self.problem("thumbnail", f"shape {tuple(thumb.shape)} is not (h, w, 3)")
            self.report.problems += _chunk_problems(GEOMETRY, "thumbnail", _scan(thumb, lambda r, d: None))
        if tmask is not None:
            if thumb is not None and tuple(tmask.shape) != tuple(thumb.shape[:2]):
                self.problem("tissue_mask", f"shape {tuple(tmask.shape)}, the thumbnail is {tuple(thumb.shape[:2])}")
            count = [0]

            def add(region, data):
                count[0] += int(np.count_nonzero(data))

            failed = _scan(tmask, add)
            self.report.problems += _chunk_problems(GEOMETRY, "tissue_mask", failed)
            tissue = self.attrs["tissue"]
            try:
                mpp_x, mpp_y = (float(v) for v in tissue["thumbnail_mpp"])
                area = float(tissue["tissue_area_mm2"])
            except (KeyError, TypeError, ValueError):
                return
            if not failed and not math.isclose(count[0] * mpp_x * mpp_y / 1e6, area, rel_tol=1e-6, abs_tol=1e-9):
                self.problem("tissue_mask", f"{count[0]} tissue pixels do not give the recorded {area:.4g} mm²")


def _check_group(path: Path, key: str, geo: _Geometry, report: StoreReport) -> None:
    gpath = path / key
    try:
        _, attrs = _read_group(gpath)
        enc = attrs["encoder"]
        name = str(enc["name"])
    except Exception as exc:  # noqa: BLE001
        why = damage_reason(exc) if (gpath / "zarr.json").exists() and not isinstance(exc, KeyError) else (
            "its zarr.json is missing" if not (gpath / "zarr.json").exists() else "its encoder attrs are missing")
        report.problems.append(Problem(key, key, f"group metadata unreadable: {why}"))
        if not (gpath / "zarr.json").exists() and not (gpath / "embeddings").exists():
            report.unrepairable.append(f"{gpath} is not an encoder group (no zarr.json, no embeddings): a folder "
                                       "put inside the store; move it out of the store")
        else:  # a run redoes a group it cannot read, beside the store's other groups
            report.unrepairable.append(f"group {key} lost its encoder attrs (name, weights); re-embed it with "
                                       f"wsi-embed embed SLIDE --out {path.parent} --model NAME")
        return
    report.encoders[name] = enc
    report.nodes[name] = key
    node = f"{key}/embeddings"

    def problem(what: str, where: str = node) -> None:
        report.problems.append(Problem(name, where, what))

    if attrs.get("complete") is not True:
        problem("incomplete: its complete flag is not set", key)
    try:
        emb = _read_array(gpath / "embeddings")
    except Exception as exc:  # noqa: BLE001
        problem(damage_reason(exc) if (gpath / "embeddings" / "zarr.json").exists() else "its zarr.json is missing")
        return
    mask = geo.mask
    if geo.rows is not None and (emb.ndim != 3 or tuple(emb.shape[:2]) != (geo.rows, geo.cols)):
        problem(f"shape {tuple(emb.shape)}, the grid says ({geo.rows}, {geo.cols}, dim)")
        mask = None
    elif enc.get("dim") is not None and emb.ndim == 3 and emb.shape[2] != int(enc["dim"]):
        problem(f"{emb.shape[2]} features, the encoder has {enc['dim']}")
    lost, stray = [0], [0]

    def check(region, data):
        if mask is None:
            return
        m = mask[region[0], region[1]]
        lost[0] += int((~np.isfinite(data[m]).all(axis=-1)).sum())
        stray[0] += int((~np.isnan(data[~m]).all(axis=-1)).sum())

    failed = _scan(emb, check)
    report.problems += _chunk_problems(name, node, failed)
    if mask is None:
        return
    n_cells = int(mask.sum())
    if lost[0]:
        problem(f"{lost[0]} of {n_cells} embedded cells have no finite embedding"
                + ("" if failed else ": chunk files lost"))
    if stray[0]:
        problem(f"{stray[0]} cells outside the mask have values")
    if attrs.get("cells") is not None and int(attrs["cells"]) != n_cells:
        problem(f"{attrs['cells']} cells recorded, the mask has {n_cells}", key)


def verify_store(path: str | os.PathLike, groups: Iterable[str] | None = None) -> StoreReport:
    """Check one store (see the module doc). Reads every chunk; memory stays about one byte per cell.
    ``groups``: check only these encoder groups (node names) beside the geometry, as a reader of
    one encoder needs (export, index)."""
    path = Path(path)
    report = StoreReport(path)
    if not path.is_dir():
        report.problems.append(Problem(GEOMETRY, "", "no such store"))
        report.unrepairable.append("it does not exist")
        return report
    try:
        geo = _Geometry(path, report)
        geo.check()
        keys = group_dirs(path)
        if geo.attrs is not None and not keys:
            report.problems.append(Problem(GEOMETRY, "encoder groups", "none (a store is written with at least one)"))
            report.unrepairable.append("its embeddings are gone, and with them the record of which encoder made "
                                       f"them; re-embed the slide with wsi-embed embed SLIDE --out {path.parent} "
                                       "--model NAME --overwrite")
        wanted = None if groups is None else set(groups)
        for key in keys if wanted is None else [k for k in keys if k in wanted]:
            _check_group(path, key, geo, report)
    finally:
        settle_zarr_reads()
    log.info("%s", report.line())
    return report


def find_stores(target: str | os.PathLike, *, tidy: bool = False) -> list[Path]:
    """The stores to check: ``target`` itself when it is a store, else every ``*.zarr`` in it.
    ``tidy`` (a repair): the temporaries of ended runs in a folder are removed first."""
    target = Path(target)
    if not target.exists():
        raise WsiEmbedError(f"{target}: no such file or directory; give an output folder or a store")
    refuse_inside_a_store(target)
    refuse_a_temporary_store(target, WsiEmbedError)
    if target.name.endswith(".zarr") or (target / "zarr.json").exists():
        return [target]
    if not target.is_dir():
        raise WsiEmbedError(f"{target}: not a folder; give an output folder of wsi-embed embed or a <slide_id>.zarr store")
    _restore_interrupted_repairs(target)
    if tidy:
        for path in remove_dead_temporaries(target):
            log.info("removed %s, left by a run that ended", path)
    stores = sorted(p for p in target.iterdir() if p.name.endswith(".zarr") and p.is_dir()
                    and not is_temporary(p.name) and not p.name.startswith("."))
    if not stores:
        if any(is_temporary(p.name) for p in target.glob(".*.zarr*")):
            raise WsiEmbedError(f"{target}: no finished store in it yet (a run stopped before its first slide was "
                                "done); rerun wsi-embed embed with the same options to resume")
        if (target / "manifest.csv").exists():
            raise WsiEmbedError(f"{target}: no stores in it; its manifest.csv (or report.html) says why each slide "
                                "has none")
        raise WsiEmbedError(f"{target}: no *.zarr stores in it; give the folder passed to wsi-embed embed --out")
    return stores


def _restore_interrupted_repairs(folder: Path) -> None:
    """A repair killed before its commit left the damaged store moved aside, and no store in its
    place: put it back (under the slide's lock), so it is verified, and repaired, again. Killed
    between two commits, the backup holds groups the store lacks: kept, and said. Killed after its
    last commit, the backup is stale: removed."""
    from .locks import try_lock

    for backup in folder.glob(f".*.zarr.bad{TMP_MARK}*"):
        if not owner_gone(backup.name):
            continue
        try:
            lock, _ = try_lock(folder, store_slide_id(store_of_backup(backup)))
            if lock is not None:
                with lock:
                    settle_repair_backup(backup)
        except (OSError, WsiEmbedError) as exc:  # left for the next embed of that slide
            log.warning("%s: could not be put back (%s)", backup, exc)


# -- repair ----------------------------------------------------------------------------------------
@dataclass
class RepairResult:
    path: Path
    before: StoreReport
    after: StoreReport | None = None
    redone: list[str] = field(default_factory=list)  # encoders re-embedded
    rebuilt: bool = False  # the whole store (geometry damaged)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and (self.after.ok if self.after is not None else self.before.ok)

    def line(self) -> str:
        if self.before.ok:
            return self.before.line()
        if self.error:
            return f"damaged  {self.path}: {self.before.summary()}; not repaired: {self.error}"
        what = ("rebuilt the store with " if self.rebuilt else "re-embedded ") + ", ".join(self.redone)
        if self.after is not None and not self.after.ok:
            return f"damaged  {self.path}: {what}, still damaged: {self.after.summary()}"
        return f"repaired {self.path}: {what}"

    def to_dict(self) -> dict:
        return {**self.before.to_dict(), "repaired": self.ok and not self.before.ok, "redone": self.redone,
                "rebuilt": self.rebuilt, "error": self.error,
                "after": self.after.to_dict() if self.after is not None else None}


def _weights_for(enc: dict) -> str:
    if enc.get("weights_random"):
        return "random"
    path = enc.get("weights_path")
    if path and Path(path).is_file():
        return str(path)
    return "auto"


def _other_weights(encoders: dict[str, dict]) -> str | None:
    """Why a repair would embed with other weights than the store records (a file changed or swapped
    since), or None. Weights still to be downloaded are checked by the run itself."""
    from .resume import expected_weights

    for name, enc in encoders.items():
        want = enc.get("weights_sha256")
        if enc.get("weights_random") or not want:
            continue
        recorded = enc.get("weights_path")
        if enc.get("weights_source") == "file" and recorded and not Path(recorded).is_file():
            return (f"{recorded} (the weights {name} was made with) is gone; put it back there and repair again")
        spec = _weights_for(enc)
        have = expected_weights(name, spec).sha256
        if have and have != want:
            where = recorded or "the weights folder"
            return (f"the weights {spec} for {name} are not those it was made with (sha256 {have[:12]}, the store "
                    f"records {want[:12]}); put those back at {where} and repair again")
    return None


def _plans(attrs: dict, encoders: dict[str, dict], base) -> list[tuple[str, object, list[str]]]:
    """(weights, options, encoder names) per run: one run per weights, dtype and precision."""
    from dataclasses import replace

    from .grid import GridSpec
    from .slide import BACKENDS
    from .plan import recorded_options
    from .tissue import TissueParams

    grid, tissue, slide = attrs["grid"], attrs["tissue"], attrs["slide"]
    recorded = {f.name: tissue[f.name] for f in fields(TissueParams) if f.name in tissue}
    recorded.setdefault("pen_marks", "keep")  # stores from before pen detection: rebuild them as they were
    tissue_params = TissueParams(**recorded)
    backend = slide.get("backend") if slide.get("backend") in BACKENDS else "auto"
    common = replace(base, grid=GridSpec(mpp=float(grid["target_mpp"]), patch_px=int(grid["patch_px"]),
                                         stride_px=int(grid["stride_px"])),
                     min_tissue=float(tissue["min_tissue"]), tissue=tissue_params, backend=backend,
                     block=grid.get("block"), max_patches=tissue.get("max_patches"), overwrite=True,
                     **recorded_options(tissue))
    runs: dict[tuple, list[str]] = {}
    for name, enc in encoders.items():
        key = (_weights_for(enc), enc.get("dtype") or base.dtype, enc.get("precision") or base.precision)
        runs.setdefault(key, []).append(name)
    return [(w, replace(common, dtype=d, precision=p), names) for (w, d, p), names in runs.items()]


def _locked_by_another(out_dir: Path, slide_id: str, options) -> str | None:
    """Who holds this slide's lock, when a live process does (the repair then leaves it alone)."""
    from .locks import _read_owner, lock_path, stale_reason

    path = lock_path(out_dir, slide_id)
    if not path.exists():
        return None
    owner = _read_owner(path)
    stale_after = getattr(options, "lock_stale_after", None) or 3600.0
    if stale_reason(path, owner, stale_after) is not None:
        return None  # the pipeline takes a stale lock over
    return owner.describe() if owner is not None else "another process"


class _RepairFailed(Exception):
    pass


def repair_store(path: str | os.PathLike, options=None, report: StoreReport | None = None) -> RepairResult:
    """Re-embed what :func:`verify_store` finds damaged in one store, then verify it again.

    A damaged encoder group is re-embedded alone (other groups and the geometry are kept); a damaged
    geometry rebuilds the whole store with all of its encoders: the damaged store is moved aside
    (``.<id>.zarr.bad.tmp-*``), restored if the repair fails and deleted after it succeeds.
    Options come from the store's own attrs; ``options`` (an :class:`~wsi_embed.jobs.EmbedOptions`)
    gives the rest (device, workers, batch size).
    """
    from .jobs import EmbedOptions, SlideJob
    from .pipeline import embed_slides
    from .slide import fingerprint

    path = Path(path)
    report = report if report is not None else verify_store(path)
    result = RepairResult(path, report)
    if report.ok:
        return result
    if report.unrepairable:
        result.error = "; ".join(report.unrepairable)
        return result
    attrs = _read_group(path)[1]
    slide = attrs["slide"]
    job = SlideJob(Path(slide["path"]), store_slide_id(path),
                   float(slide["mpp"]) if slide.get("mpp_source") == "override" else None)
    if not job.path.is_file():
        result.error = f"its slide {job.path} is not there; put it back (or re-embed it from where it is now)"
        return result
    try:
        same = fingerprint(job.path) == slide.get("fingerprint")
    except OSError as exc:
        result.error = f"its slide {job.path} cannot be read ({exc.strerror or exc})"
        return result
    if not same:
        result.error = (f"its slide {job.path} has changed since it was embedded; re-embed it with "
                        f"wsi-embed embed {job.path} --out {path.parent} --overwrite")
        return result
    busy = _locked_by_another(path.parent, job.slide_id, options)
    if busy:
        result.error = f"it is being embedded by {busy}; verify it again when that run is done"
        return result
    rebuild = report.geometry_damaged
    redo = dict(report.encoders) if rebuild else {n: report.encoders[n] for n in report.damaged_encoders}
    if not redo:
        result.error = "no encoder group left to re-embed it from"
        return result
    wrong = _other_weights(redo)
    if wrong:
        result.error = wrong
        return result
    plans = _plans(attrs, redo, options if options is not None else EmbedOptions())
    backup = repair_backup_path(path) if rebuild else None
    if backup is not None:
        os.rename(path, backup)  # the pipeline would reuse the damaged geometry of a store in place
    try:
        for weights, opts, names in plans:
            log.info("%s: re-embedding %s (weights %s)", path, ", ".join(names), weights)
            (res,) = list(embed_slides([job], path.parent, names, weights, opts))
            if res.status != "done":
                raise _RepairFailed(res.error or res.note or res.status)
            result.redone += names
    except (WsiEmbedError, _RepairFailed) as exc:
        result.error = str(exc)
        if backup is not None:
            if path.exists():
                _remove(path)  # a partial rebuild
            os.rename(backup, path)
        return result
    except BaseException:  # interrupted: leave the store as it was
        if backup is not None:
            if path.exists():
                _remove(path)
            os.rename(backup, path)
        raise
    if backup is not None:
        _remove(backup)
    result.rebuilt = rebuild
    result.after = verify_store(path)
    return result


__all__ = ["Problem", "RepairResult", "StoreReport", "find_stores", "repair_store", "verify_store"]
