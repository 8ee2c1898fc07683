"""DICOM whole-slide images: a slide is one series, a folder of files (one per level and
associated image). Finding the series of a folder, and the file through which a series opens."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UnreadableSlide

log = logging.getLogger(__name__)

DICOM_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def has_dicom_magic(path: Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble (reads 132 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_candidate_name(name: str) -> bool:
    """A name a DICOM file may have: ``.dcm``, no extension, or a numeric one (files named by UID)."""
    if name.startswith("."):
        return False
    suffix = Path(name).suffix.lower()
    return suffix in ("", ".dcm") or suffix[1:].isdigit()


def is_dicom_file(path: Path) -> bool:
    """``.dcm`` by name; an extensionless (or UID-named) file by its DICM magic."""
    path = Path(path)
    if not dicom_candidate_name(path.name):
        return False
    return path.suffix.lower() == ".dcm" or (path.is_file() and has_dicom_magic(path))


@dataclass(frozen=True)
class DicomSeries:
    uid: str | None  # SeriesInstanceUID; None when unknown (no pydicom, unreadable header)
    files: tuple[Path, ...]  # sorted by name

    @property
    def main_file(self) -> Path:
        """The file that stands for the series: its largest (level 0, as a rule), the first by name
        among equals. openslide opens the whole series through any of its files."""
        return max(self.files, key=lambda p: (p.stat().st_size, [-ord(c) for c in p.name]))


def dicom_series(folder: Path, names: list[str] | None = None) -> list[DicomSeries]:
    """The whole-slide DICOM series in ``folder`` (not recursive; ``names``: its file names, when
    already listed), in the order of their first files. Files of other DICOM kinds (DICOMDIR,
    annotations, CT...) are left out; files whose header cannot be read form a series of their own
    (uid None), which fails with a clear message when opened."""
    folder = Path(folder)
    names = os.listdir(folder) if names is None else names
    files = sorted(folder / n for n in names if dicom_candidate_name(n) and is_dicom_file(folder / n))
    groups: dict[str | None, list[Path]] = {}
    for path in files:
        sop_class, uid = _dicom_ids(path)
        if sop_class is not None and sop_class != DICOM_WSI_SOP_CLASS:
            log.debug("%s: DICOM SOP class %s is not a whole-slide image; skipped", path, sop_class)
            continue
        groups.setdefault(uid, []).append(path)
    return sorted((DicomSeries(uid, tuple(ps)) for uid, ps in groups.items()), key=lambda s: s.files[0])


def _dicom_ids(path: Path) -> tuple[str | None, str | None]:
    """(SOP class UID, SeriesInstanceUID) from the header only; (None, None) when unreadable."""
    try:
        import pydicom
    except ImportError:
        global _WARNED_NO_PYDICOM
        if not _WARNED_NO_PYDICOM:
            log.warning("pydicom is not installed: each folder of DICOM files counts as one series")
            _WARNED_NO_PYDICOM = True
        return None, None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"])
    except Exception as exc:  # not DICOM after all, or damaged: the readers will say so
        log.debug("%s: unreadable DICOM header: %s", path, exc)
        return None, None
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    uid = ds.get("SeriesInstanceUID")
    return (str(sop_class) if sop_class else None), (str(uid) if uid else None)


_WARNED_NO_PYDICOM = False


def dicom_folder_file(folder: Path) -> Path:
    """The file through which a folder holding one DICOM series is opened (its main file, as
    discovery picks it); UnreadableSlide for a folder without one, or with several series."""
    series = dicom_series(folder)
    if not series:
        raise UnreadableSlide(f"{folder}: is a directory, not a slide file, and holds no DICOM slide files; "
                              "pass the slide file itself (or a folder holding one DICOM series)")
    if len(series) > 1:
        listing = ", ".join(str(s.main_file) for s in series[:3]) + (", ..." if len(series) > 3 else "")
        raise UnreadableSlide(f"{folder}: holds {len(series)} DICOM series; pass one file of the series to open "
                              f"({listing}); `wsi-embed embed` on the folder embeds each series as its own slide")
    return series[0].main_file
