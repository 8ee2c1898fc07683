"""Multiple-instance learning over finished stores: bag datasets, padding collate, patient splits.

    from torch.utils.data import DataLoader
    from wsi_embed.mil import BagDataset, collate_bags, patient_splits

    ds = BagDataset("out/", "labels.csv", "lunit-dino-vits16", max_instances=4096)
    for fold in patient_splits(ds, n_folds=5):
        train = DataLoader(ds.subset(fold.train), batch_size=4, shuffle=True, collate_fn=collate_bags,
                           num_workers=4)

A dataset holds only paths, labels and names: each item opens its store in ``__getitem__`` and reads
one bag (:meth:`wsi_embed.store.EmbeddingStore.bag`), so it pickles into DataLoader workers and
memory is bounded by the batch, not the cohort. Everything that can be checked from metadata
(stores present and complete, the encoder in each, one embedding dim) is checked when the dataset
is made, so a bad cohort fails at once with a one-line error, not in a worker mid-epoch.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import re
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import CorruptStore, EncoderMismatch, IncompleteStore, InvalidOption, LabelsError
from .grid import cells_under
from .store import completed_encoders, existing_output_folder, group_name, open_store, store_slide_id

log = logging.getLogger(__name__)

MODES = ("bag", "grid")
_VAL_NAMES = ("val", "valid", "validation")


# -- the labels table ------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelTable:
    """A labels CSV read and checked: one row per slide, labels as class indices into ``classes``."""

    path: str
    slide_ids: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    patients: tuple[str, ...]  # the slide id where there is no patient_id column
    folds: tuple[str, ...] | None = None  # the `fold` column, when present
    splits: tuple[str, ...] | None = None  # the `split` column, when present

    def select(self, keep: Sequence[int]) -> "LabelTable":
        pick = lambda seq: None if seq is None else tuple(seq[i] for i in keep)  # noqa: E731
        return LabelTable(self.path, pick(self.slide_ids), pick(self.labels), self.classes, pick(self.patients),
                          pick(self.folds), pick(self.splits))


def _class_names(raw: list[str]) -> list[str]:
    """Each label as its class name: when every label is a number, numbers that are equal are one
    class (``1``, ``1.0`` and `` 1`` from a spreadsheet: ``1``); else the stripped text."""
    text = [v.strip() for v in raw]
    try:
        numbers = [float(v) for v in text]
    except ValueError:
        return text
    if not all(math.isfinite(n) for n in numbers):
        return text
    return [str(int(n)) if n.is_integer() else repr(n) for n in numbers]


def _sort_values(values: set[str]) -> list[str]:
    """Class names in a natural order: numerically when every one is a number, else as text."""
    try:
        return sorted(values, key=lambda v: (float(v), v))
    except ValueError:
        return sorted(values)


_RESERVED_COLUMNS = ("slide_id", "patient_id", "split", "fold")
# a patient column under another name (TCGA's bcr_patient_barcode, case_id, participant_id, MRN ...)
_PATIENT_LOOKALIKE = re.compile(r"patient|participant|donor|subject|individual|submitter|(^|[^a-z])(case|mrn)"
                                r"([^a-z]|id|$)")
# what pandas' read_csv takes for a missing value (its default na_values): a label left out, not a class
_MISSING = frozenset({"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan", "<na>",
                      "n/a", "na", "null", "nan", "none"})


def _missing(value: str) -> bool:
    return value.strip().lower() in _MISSING


def read_labels(path: str | os.PathLike, label_column: str = "label") -> LabelTable:
    """Read a labels CSV (``slide_id``, the label column; optional ``patient_id``, ``split``,
    ``fold``; these four in any case). Rows with an empty label are left out (logged). Raises
    :class:`LabelsError` for a missing column, a repeated slide id, fewer than two classes, or a
    patient column under another name (``patient``, ``case_id``...), which would split a patient's
    slides over folds."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = []
            for row in reader:
                if None in row:  # csv puts the fields beyond the header under None
                    raise LabelsError(f"{path}, line {reader.line_num}: {len(row[None])} more field(s) than the "
                                      "header; quote values that hold commas, or remove trailing commas")
                rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
    except FileNotFoundError as exc:
        raise LabelsError(f"{path}: labels file not found; check the path") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"{path}: cannot read the labels file ({exc}); give a UTF-8 CSV") from exc
    rename = {c: c.lower() for c in columns
              if c.lower() in _RESERVED_COLUMNS and c != c.lower() and c.lower() not in columns}
    if rename:  # Slide_ID, Patient_ID ...: the same columns in another case
        columns = [rename.get(c, c) for c in columns]
        rows = [{rename.get(k, k): v for k, v in row.items()} for row in rows]
    lookalike = [c for c in columns if c != label_column and c.lower() not in _RESERVED_COLUMNS
                 and _PATIENT_LOOKALIKE.search(c.lower())]
    if "patient_id" not in columns and lookalike:
        raise LabelsError(f"{path}: column {lookalike[0]!r} looks like a patient column, but slides are grouped by "
                          "'patient_id' (so that no patient is in two folds): rename it patient_id, or rename it to "
                          "something else if it is not one")
    if len(columns) == 1 and any(sep in columns[0] for sep in ";\t|"):
        raise LabelsError(f"{path}: one column {columns[0]!r}: the values are separated by "
                          f"{'a tab' if chr(9) in columns[0] else repr(next(s for s in ';|' if s in columns[0]))}, "
                          "not commas; save it as a comma-separated CSV")
    for needed, how in (("slide_id", "add a slide_id column (the store names without .zarr)"),
                        (label_column, "name the label column with label_column= (--label-column)")):
        if needed not in columns:
            raise LabelsError(f"{path}: no {needed!r} column (columns: {', '.join(columns) or 'none'}); {how}")
    kept, seen, empty, no_id = [], set(), 0, 0
    for row in rows:
        sid = row["slide_id"]
        if not sid:
            no_id += any(row.values())
            continue
        if sid in seen:
            raise LabelsError(f"{path}: slide {sid!r} is listed twice; keep one row per slide")
        seen.add(sid)
        if _missing(row[label_column]):
            empty += 1
            continue
        kept.append(row)
    if empty:
        log.warning("%s: %d slides with an empty or missing %r (blank, NA, NaN, #N/A ...) are left out", path,
                    empty, label_column)
    if no_id:
        log.warning("%s: %d rows without a slide_id are left out", path, no_id)
    for column in ("fold", "split"):
        blank = next((r["slide_id"] for r in kept if column in columns and _missing(r[column])), None)
        if blank is not None:
            raise LabelsError(f"{path}: slide {blank!r} has no {column} value; give every labelled slide one, or "
                              f"drop the {column} column")
    names = _class_names([r[label_column] for r in kept])
    classes = _sort_values(set(names))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "no labels"
        raise LabelsError(f"{path}: column {label_column!r} has {found} over {len(kept)} slides; "
                          "a classifier needs at least two classes")
    index = {c: i for i, c in enumerate(classes)}
    optional = {c: tuple(r[c] for r in kept) if c in columns else None for c in ("fold", "split")}
    if optional["fold"] is not None:  # 1 and 1.0 from a spreadsheet are one fold, as they are one class
        optional["fold"] = tuple(_class_names(list(optional["fold"])))
    return LabelTable(
        path=str(path),
        slide_ids=tuple(r["slide_id"] for r in kept),
        labels=tuple(index[name] for name in names),
        classes=tuple(classes),
        patients=tuple(r.get("patient_id") or r["slide_id"] for r in kept),  # no patient: the slide is one
        folds=optional["fold"],
        splits=optional["split"],
    )


# -- the dataset -------------------------------------------------------------------------------

def _store_paths(stores: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[Path | None, list[Path]]:
    """(the folder, or None for a list) and the store paths it names."""
    if isinstance(stores, (str, os.PathLike)):
        path = Path(stores)
        if path.suffix == ".zarr":
            return None, [path]
        existing_output_folder(path, IncompleteStore)
        return path, sorted(p for p in path.glob("*.zarr") if not p.name.startswith("."))
    paths = [Path(p) for p in stores]
    first: dict[str, Path] = {}
    for path in paths:
        other = first.setdefault(store_slide_id(path), path)
        if other != path:  # labels name slides by id: two stores of one id cannot both be meant
            raise LabelsError(f"{path}: slide {store_slide_id(path)!r} is also {other}; give each slide id once")
    return None, paths


def _resolve_encoder(path: Path, encoder: str, done: list[str]) -> str:
    """The name of ``encoder`` as recorded in this store (``timm:foo`` or its group name ``timm-foo``)."""
    for name in done:
        if encoder in (name, group_name(name)):
            return name
    if (path / group_name(encoder)).is_dir():
        raise IncompleteStore(f"{path}: encoder {encoder!r} is incomplete there; rerun wsi-embed embed "
                              f"--model {encoder} on that slide")
    raise EncoderMismatch(f"{path}: has no encoder {encoder!r} (it has: {', '.join(done) or 'none'}); "
                          f"pick one of those or run wsi-embed embed --model {encoder}")


class BagDataset(torch.utils.data.Dataset):
    """One item per labelled slide, read lazily from its store.

    ``stores``: an output folder of ``wsi-embed embed`` (every slide in ``labels`` must have a complete
    store there; stores without a label are ignored), one ``.zarr`` path, or a list of store paths
    (each must have a label). ``labels``: a CSV with ``slide_id`` and ``label_column``; optional
    ``patient_id``, ``split``, ``fold``. ``encoder``: the model name (``timm:test_vit``) or its group
    name (``timm-test_vit``).

    ``mode="bag"`` yields ``features`` (N, D) float32, ``coords`` (N, 2) int64 level-0 (x, y) of each
    cell's top-left corner, ``coords_um`` (N, 2) float64 (the same in µm), ``grid`` (N, 2) int64
    (row, col), ``label`` (int64 class index into :attr:`classes`) and ``slide_id``; cells in
    row-major order. ``mode="grid"`` yields ``features`` (rows, cols, D) float32, zero outside
    ``mask`` (rows, cols) bool (the store's mask), ``coords`` (rows, cols, 2), ``coords_um``,
    ``label`` and ``slide_id``.

    ``max_instances``: at most this many cells per bag, a random subset kept in row-major order. The
    subset depends only on ``seed`` and the slide id: the same every epoch and in every worker. For
    a fresh subset each epoch set ``ds.seed = epoch`` before the epoch. ``split``: keep only the
    rows whose ``split`` column has this value.
    """

    def __init__(self, stores: str | os.PathLike | Sequence[str | os.PathLike], labels: str | os.PathLike,
                 encoder: str, *, label_column: str = "label", mode: str = "bag",
                 max_instances: int | None = None, seed: int = 0, split: str | None = None):
        if mode not in MODES:
            raise InvalidOption(f"BagDataset: mode must be one of {', '.join(MODES)}, not {mode!r}")
        if max_instances is not None and (mode == "grid" or int(max_instances) < 1):
            raise InvalidOption("BagDataset: max_instances is for mode='bag' and must be at least 1")
        self.encoder_requested = encoder
        self.mode = mode
        self.max_instances = None if max_instances is None else int(max_instances)
        self.seed = int(seed)
        table = read_labels(labels, label_column)
        folder, paths = _store_paths(stores)
        by_id = {store_slide_id(p): p for p in paths}
        if folder is not None:
            rows = list(range(len(table.slide_ids)))
            for i in rows:
                sid = table.slide_ids[i]
                if sid not in by_id or not completed_encoders(by_id[sid]):
                    raise IncompleteStore(f"{sid}: labelled in {table.path} but {folder} holds no complete store "
                                          f"{sid}.zarr; run wsi-embed embed on that slide with --out {folder}")
        else:
            where = {s: i for i, s in enumerate(table.slide_ids)}
            missing = [s for s in by_id if s not in where]
            if missing:
                raise LabelsError(f"{table.path}: no label for {len(missing)} of the stores given "
                                  f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                                  "add them to the labels file")
            rows = [where[s] for s in by_id]
        if split is not None:
            if table.splits is None:
                raise LabelsError(f"{table.path}: split={split!r} asked for, but there is no 'split' column")
            same = (lambda v: v.lower() in _VAL_NAMES) if split.lower() in _VAL_NAMES else (
                lambda v: v.lower() == split.lower())
            rows = [i for i in rows if same(table.splits[i])]
            if not rows:
                raise LabelsError(f"{table.path}: no row has split {split!r} (values: "
                                  f"{', '.join(sorted(set(table.splits)))})")
        self.table = table.select(rows)
        self.classes: tuple[str, ...] = table.classes
        self.paths: list[str] = []
        self.encoders: list[str] = []  # the encoder's recorded name in each store
        dims: dict[int, list[str]] = {}
        self.empty: list[str] = []  # labelled slides whose stores hold no embedded cell: left out
        kept = []
        for i, sid in enumerate(self.table.slide_ids):
            path = by_id[sid]
            store = open_store(path)  # refuses temporary and unfinished stores
            name = _resolve_encoder(path, encoder, store.encoders)
            dims.setdefault(int(store.embeddings(name).shape[2]), []).append(sid)
            if not store.mask.any():  # no tissue left (ink, annotations, drops): an empty bag trains nothing
                self.empty.append(sid)
                continue
            kept.append(i)
            self.paths.append(str(path))
            self.encoders.append(name)
        if self.empty:
            log.warning("%s: %d labelled slide(s) have no embedded cells and are left out: %s",
                        folder or "stores", len(self.empty), ", ".join(self.empty[:5]))
            self.table = self.table.select(kept)
            if len(set(self.table.labels)) < 2 and len(set(table.labels)) >= 2:
                raise LabelsError(f"{table.path}: after leaving out {len(self.empty)} slide(s) without embedded "
                                  "cells, one class is left; check their tissue masks and annotations")
        if len(dims) > 1:
            parts = "; ".join(f"dim {d} in {len(ids)} ({', '.join(ids[:2])}{', ...' if len(ids) > 2 else ''})"
                              for d, ids in sorted(dims.items()))
            raise EncoderMismatch(f"{folder or 'stores'}: encoder {encoder!r} has mixed embedding dims ({parts}); "
                                  "embed every slide with the same model")
        self.dim: int | None = next(iter(dims), None)
        log.info("BagDataset: %d slides, %d classes, encoder %s (dim %s), mode %s",
                 len(self), len(self.classes), encoder, self.dim, mode)

    # plain attributes only (paths, names, tuples): the dataset pickles into DataLoader workers
    @property
    def slide_ids(self) -> tuple[str, ...]:
        return self.table.slide_ids

    @property
    def labels(self) -> tuple[int, ...]:
        return self.table.labels

    @property
    def patients(self) -> tuple[str, ...]:
        return self.table.patients

    def __len__(self) -> int:
        return len(self.table.slide_ids)

    def subset(self, slide_ids: Sequence[str]) -> "BagDataset":
        """A dataset of these slides (in this order), with the same classes, encoder and options."""
        where = {s: i for i, s in enumerate(self.slide_ids)}
        unknown = [s for s in slide_ids if s not in where]
        if unknown:
            raise LabelsError(f"{self.table.path}: not in this dataset: {', '.join(unknown[:3])}")
        keep = [where[s] for s in slide_ids]
        out = copy.copy(self)
        out.table = self.table.select(keep)
        out.paths = [self.paths[i] for i in keep]
        out.encoders = [self.encoders[i] for i in keep]
        return out

    def sample_indices(self, slide_id: str, n: int) -> np.ndarray:
        """Which of a bag's ``n`` cells are kept under ``max_instances`` (sorted): a function of
        ``seed`` and the slide id only."""
        if self.max_instances is None or n <= self.max_instances:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, zlib.crc32(slide_id.encode())])
        return np.sort(rng.choice(n, self.max_instances, replace=False))

    def __getitem__(self, i: int) -> dict[str, Any]:
        sid, path, name = self.slide_ids[i], self.paths[i], self.encoders[i]
        store = open_store(path)
        mpp = float(store.attrs["slide"]["mpp"])
        label = torch.tensor(self.labels[i], dtype=torch.int64)
        if self.mode == "grid":
            mask = store.mask
            emb = np.asarray(store.embeddings(name)[...], dtype=np.float32)
            coords = store.coords
            lost = int((~np.isfinite(emb[mask]).all(axis=1)).sum())
            if lost:
                raise CorruptStore(f"{path}: {lost} embedded cells have no finite embedding; "
                                   f"see wsi-embed verify {path}")
            emb[~mask] = 0.0
            return {"features": torch.from_numpy(emb), "mask": torch.from_numpy(mask),
                    "coords": torch.from_numpy(coords), "coords_um": torch.from_numpy(coords * mpp),
                    "label": label, "slide_id": sid}
        feats, xy = store.bag(name)
        grid = np.argwhere(store.mask)  # row-major, the order bag() returns its cells in
        keep = self.sample_indices(sid, len(feats))
        if len(keep) < len(feats):
            feats, xy, grid = feats[keep], xy[keep], grid[keep]
        return {"features": torch.from_numpy(np.ascontiguousarray(feats)),
                "coords": torch.from_numpy(np.ascontiguousarray(xy)),
                "coords_um": torch.from_numpy(xy * mpp),
                "grid": torch.from_numpy(grid.astype(np.int64)),
                "label": label, "slide_id": sid}


def collate_bags(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of items to the longest bag (or, in grid mode, to the largest rows x cols) with
    zeros. Returns the same keys, tensors stacked (``label`` (B,)), ``slide_id`` a list, and ``mask``:
    (B, N_max) bool in bag mode, True on real cells; (B, rows_max, cols_max) in grid mode, each
    item's own mask padded with False."""
    if not batch:
        raise ValueError("collate_bags: empty batch")
    spatial = 2 if batch[0]["features"].ndim == 3 else 1
    sizes = [tuple(item["features"].shape[:spatial]) for item in batch]
    full = tuple(max(s[d] for s in sizes) for d in range(spatial))
    out: dict[str, Any] = {}
    for key, first in batch[0].items():
        values = [item[key] for item in batch]
        if not isinstance(first, torch.Tensor):
            out[key] = values
        elif first.ndim == 0:
            out[key] = torch.stack(values)
        else:
            padded = first.new_zeros((len(batch), *full, *first.shape[spatial:]))
            for b, v in enumerate(values):
                padded[(b, *(slice(0, n) for n in v.shape[:spatial]))] = v
            out[key] = padded
    if spatial == 1:
        lengths = torch.tensor([s[0] for s in sizes])
        out["mask"] = torch.arange(full[0])[None, :] < lengths[:, None]
    return out


# -- patient-level splits ----------------------------------------------------------------------

@dataclass(frozen=True)
class Fold:
    """One split: slide ids to train on, to validate on (only from a ``split`` column) and to test on."""

    fold: int
    train: tuple[str, ...]
    test: tuple[str, ...]
    val: tuple[str, ...] = field(default=())
    name: str = ""  # the labels' own fold value, when a fold column gave it


def _check_patients_whole(table: LabelTable, groups: Sequence[str], column: str) -> None:
    first: dict[str, str] = {}
    for patient, group in zip(table.patients, groups):
        if first.setdefault(patient, group) != group:
            raise LabelsError(f"{table.path}: patient {patient!r} is in {column} {first[patient]!r} and {group!r}; "
                              f"put all of a patient's slides in one {column}")


def patient_splits(source: BagDataset | LabelTable | str | os.PathLike, n_folds: int = 5, *, seed: int = 0,
                   label_column: str = "label") -> list[Fold]:
    """Patient-level cross-validation folds: no patient has slides in two folds.

    ``source``: a :class:`BagDataset`, a :class:`LabelTable` or a labels CSV. A ``fold`` column is used
    as it is (one fold per value: test on it, train on the rest); else a ``split`` column gives one
    fold (``train``, ``val``/``valid``/``validation``, ``test``); else ``n_folds`` stratified folds
    are drawn with scikit-learn's ``StratifiedGroupKFold`` (grouped by ``patient_id``, or by slide
    where there is none), shuffled with ``seed``. Either column is refused if it splits a patient.
    """
    if isinstance(source, BagDataset):
        table = source.table
    elif isinstance(source, LabelTable):
        table = source
    else:
        table = read_labels(source, label_column)
    ids = table.slide_ids
    if table.folds is not None:
        _check_patients_whole(table, table.folds, "fold")
        folds = []
        for k, value in enumerate(_sort_values(set(table.folds))):
            test = tuple(s for s, f in zip(ids, table.folds) if f == value)
            folds.append(Fold(k, tuple(s for s in ids if s not in set(test)), test, name=value))
        if len(folds) < 2:
            raise LabelsError(f"{table.path}: the fold column has one value; give at least two folds")
        return folds
    if table.splits is not None:
        names = [s.lower() for s in table.splits]
        bad = sorted(set(names) - {"train", "test", *_VAL_NAMES})
        if bad:
            raise LabelsError(f"{table.path}: split values must be train, val or test, not {', '.join(bad)}")
        _check_patients_whole(table, ["val" if n in _VAL_NAMES else n for n in names], "split")
        pick = lambda wanted: tuple(s for s, n in zip(ids, names) if n in wanted)  # noqa: E731
        fold = Fold(0, pick({"train"}), pick({"test"}), pick(set(_VAL_NAMES)))
        if not fold.train or not fold.test:
            raise LabelsError(f"{table.path}: the split column needs both train and test rows")
        return [fold]
    from sklearn.model_selection import StratifiedGroupKFold

    if n_folds < 2:
        raise InvalidOption(f"--folds {n_folds}: cross-validation needs at least 2 folds (n_folds)")
    n_patients = len(set(table.patients))
    if n_patients < n_folds:
        raise LabelsError(f"{table.path}: {n_patients} patient{'s' if n_patients != 1 else ''} cannot fill {n_folds} folds; "
                          + (f"use at most {n_patients} folds" if n_patients >= 2 else
                             "cross-validation needs slides of at least 2 patients"))
    per_class: dict[int, set] = {}
    for label, patient in zip(table.labels, table.patients):
        per_class.setdefault(label, set()).add(patient)
    fewest = min(len(p) for p in per_class.values())
    if fewest < n_folds:
        fix = (f"use at most {fewest} folds, or give a fold column" if fewest >= 2 else
               "stratified folds need at least 2 patients per class: add slides, or give a fold or split column")
        raise LabelsError(f"{table.path}: a class has only {fewest} patient(s), too few for {n_folds} stratified "
                          f"folds; {fix}")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    try:
        for k, (train, test) in enumerate(splitter.split(np.zeros(len(ids)), table.labels, table.patients)):
            folds.append(Fold(k, tuple(ids[i] for i in sorted(train)), tuple(ids[i] for i in sorted(test))))
    except ValueError as exc:  # scikit-learn's own limits on this table
        raise LabelsError(f"{table.path}: cannot make {n_folds} patient-level folds ({exc}); use fewer folds") from None
    return folds


# -- attention heatmaps ------------------------------------------------------------------------

# viridis at 9 stops: dark blue (low) to yellow (high), readable on pink tissue and in grey print
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to uint8 RGB (viridis, linearly interpolated)."""
    x = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    t = (x - lo)[..., None]
    return np.rint(_VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t).astype(np.uint8)


def attention_heatmap(store_path: str | os.PathLike, scores: np.ndarray, *, title: str | None = None,
                      alpha: float = 0.55, min_side: int = 768) -> Image.Image:
    """The store's thumbnail with each embedded cell tinted by its score (``scores``: (rows, cols),
    NaN or ignored outside the mask), min-max scaled over the slide, viridis. ``title`` is written
    above the picture. A thumbnail whose longer side is under ``min_side`` px is enlarged (by a
    whole factor) first."""
    store = open_store(store_path)
    attrs = store.attrs
    thumb = np.asarray(store._geometry("thumbnail")[...])
    mask = store.mask
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != mask.shape:
        raise ValueError(f"attention_heatmap: scores {scores.shape} do not match the grid {mask.shape}")
    vals = np.where(mask, scores, np.nan)
    finite = np.isfinite(vals)
    lo, hi = (np.nanmin(vals), np.nanmax(vals)) if finite.any() else (0.0, 1.0)
    norm = (vals - lo) / (hi - lo) if hi > lo else np.where(finite, 1.0, np.nan)
    grid, (sx, sy) = attrs["grid"], attrs["tissue"]["thumbnail_scale"]
    f = -(-min_side // max(thumb.shape[:2]))  # small thumbnails are enlarged, so the caption fits
    if f > 1:
        thumb = np.asarray(Image.fromarray(thumb).resize((thumb.shape[1] * f, thumb.shape[0] * f),
                                                         Image.Resampling.LANCZOS))
        sx, sy = sx * f, sy * f
    # each thumbnail pixel -> the cell whose centre is nearest its level-0 point
    (ox, oy), stride = grid["origin0"], float(grid["stride0"])
    cell = float(grid.get("cell_size0", stride))
    h, w = thumb.shape[:2]
    c, okx = cells_under((np.arange(w) + 0.5) / sx, ox + np.arange(mask.shape[1]) * stride, stride, cell)
    r, oky = cells_under((np.arange(h) + 0.5) / sy, oy + np.arange(mask.shape[0]) * stride, stride, cell)
    inside = oky[:, None] & okx[None, :]
    cell_vals = norm[np.ix_(r, c)]
    tint = inside & np.isfinite(cell_vals)
    out = thumb.astype(np.float32)
    out[tint] = (1 - alpha) * out[tint] + alpha * colormap(cell_vals[tint]).astype(np.float32)
    picture = Image.fromarray(np.rint(out).astype(np.uint8))
    if title:
        from .qc import _with_caption

        picture = _with_caption(picture, title)
    return picture
