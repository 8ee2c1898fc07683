"""Finding a cohort's slides and giving each a unique, stable slide id.

Inputs are files (used as they are), directories (searched recursively by extension) and list
files (``--list``: TXT with one path per line, or CSV with a ``path`` column and optional ``mpp``
and ``slide_id`` columns). Ids are computed over the whole cohort, before any sharding, so every
shard and every rerun maps a slide to the same store.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from ..errors import InvalidOption, SlideNotFound
from ..jobs import SlideJob, slide_id_for

log = logging.getLogger(__name__)

# Formats OpenSlide 4 or TiffSlide read. DICOM is handled per directory (one slide = one series).
SLIDE_EXTENSIONS = frozenset({
    "svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "svslide", "bif", "dcm", "czi", "qptiff",
})
_SKIP_DIRS = {"__pycache__", "$RECYCLE.BIN", "System Volume Information"}


@dataclass(frozen=True)
class SlideEntry:
    path: Path
    mpp: float | None = None
    slide_id: str | None = None  # given explicitly in a list file


def is_slide_file(path: Path) -> bool:
    name = path.name
    if name.startswith("."):  # hidden files, and macOS "._x.svs" resource forks
        return False
    return path.suffix.lower().lstrip(".") in SLIDE_EXTENSIONS


def find_slides(directory: Path) -> list[Path]:
    """Slide files under ``directory``, recursively, sorted. A DICOM series (a folder of .dcm
    files, one per level) counts once, by its first file: OpenSlide finds the rest."""
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()  # (st_dev, st_ino): followed symlinks must not loop
    for root, dirs, files in os.walk(directory, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        # Skip hidden folders, our own outputs (.zarr) and MIRAX/VMS data folders are harmless (no
        # slide extensions inside), so only the cheap prunes here.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS
                         and not d.endswith(".zarr"))
        slides = sorted(Path(root, f) for f in files if is_slide_file(Path(f)))
        dicom = [p for p in slides if p.suffix.lower() == ".dcm"]
        found.extend(p for p in slides if p.suffix.lower() != ".dcm")
        if dicom:
            found.append(dicom[0])
    return found


def _float_or_none(value: str | None, where: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise InvalidOption(f"{where}: mpp {value!r} is not a number") from None
    if not mpp > 0:
        raise InvalidOption(f"{where}: mpp must be > 0, got {value!r}")
    return mpp


def read_list(list_file: str | os.PathLike) -> list[SlideEntry]:
    """Read a TXT (one path per line; ``#`` comments) or CSV (header with ``path``; optional ``mpp``,
    ``slide_id``) list. Relative paths are relative to the list file's folder, so a list works
    from any working directory (SLURM jobs start wherever they start)."""
    list_file = Path(list_file)
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SlideNotFound(f"{list_file}: slide list not found; check --list") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOption(f"{list_file}: cannot read the slide list ({exc})") from None
    base = list_file.parent
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    first = next(csv.reader([lines[0]]))
    header = [h.strip().lower() for h in first]
    entries = []
    if "path" in header:
        dialect_delim = "\t" if "\t" in lines[0] and "," not in lines[0] else ","
        for n, row in enumerate(csv.DictReader(lines, delimiter=dialect_delim), start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if not row.get("path"):
                continue
            where = f"{list_file}, line {n}"
            entries.append(SlideEntry(_resolve(base, row["path"]), _float_or_none(row.get("mpp"), where),
                                      row.get("slide_id") or row.get("id") or None))
    else:
        if len(first) > 1 and any(h in ("mpp", "slide", "file", "filename") for h in header):
            raise InvalidOption(f"{list_file}: a CSV slide list needs a 'path' column (found {first})")
        entries = [SlideEntry(_resolve(base, ln.strip())) for ln in lines]
    return entries


def _resolve(base: Path, text: str) -> Path:
    path = Path(os.path.expanduser(text))
    return Path(os.path.abspath(path if path.is_absolute() else base / path))


def collect(inputs: Sequence[str | os.PathLike] = (), list_file: str | os.PathLike | None = None,
            slide_mpp: float | None = None) -> list[SlideEntry]:
    """Inputs (files, directories) and list entries as one de-duplicated list, in input order.

    A path that does not exist is kept: it becomes a job that fails with a clear message, so one
    mistyped path is recorded in the manifest instead of stopping the cohort.
    """
    # Absolute (not resolved: symlinked cohorts keep their names) so manifests and SLURM tasks that
    # start elsewhere agree on every path.
    raw: list[SlideEntry] = [SlideEntry(Path(os.path.abspath(p)), slide_mpp) for p in inputs]
    if list_file is not None:
        raw += [SlideEntry(e.path, e.mpp if e.mpp is not None else slide_mpp, e.slide_id)
                for e in read_list(list_file)]
    entries: list[SlideEntry] = []
    seen: set[str] = set()
    for entry in raw:
        if entry.path.is_dir():
            found = find_slides(entry.path)
            if not found:
                log.warning("%s: no slide files found (extensions: %s)", entry.path,
                            ", ".join(sorted(SLIDE_EXTENSIONS)))
            expanded = [SlideEntry(p, entry.mpp) for p in found]
        else:
            expanded = [entry]
        for e in expanded:
            key = os.path.realpath(e.path)
            if key in seen:  # the same file through two inputs (DIR and DIR/x.svs) is one slide
                continue
            seen.add(key)
            entries.append(e)
    return entries


def _common_root(paths: Iterable[Path]) -> Path:
    absolute = [os.path.abspath(p) for p in paths]
    return Path(os.path.commonpath(absolute)) if len(absolute) > 1 else Path(absolute[0]).parent


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def assign_ids(entries: Sequence[SlideEntry]) -> list[SlideJob]:
    """One :class:`SlideJob` per entry, with unique ids.

    The id is the file name without its extension (DICOM: the series folder's name). Where
    several slides share a name, each gets ``<name>-<hash>``, the hash being of its path
    relative to the common folder of those same-named slides: it does not depend on input order,
    on the other slides of the run, or on where the cohort is mounted. Ids are compared
    case-insensitively (stores must not clash on case-insensitive file systems).
    """
    base_ids = [e.slide_id or _natural_id(e.path) for e in entries]
    explicit = [e.slide_id is not None for e in entries]
    for entry, sid in zip(entries, base_ids):
        if not sid or sid.startswith(".") or any(c in sid for c in '/\\\0'):
            raise InvalidOption(f"slide id {sid!r} for {entry.path} cannot name a store (no '/', '\\', "
                                "leading '.' or empty ids); fix the slide_id column or rename the file")
    groups: dict[str, list[int]] = {}
    for i, sid in enumerate(base_ids):
        groups.setdefault(sid.casefold(), []).append(i)
    ids = list(base_ids)
    for members in groups.values():
        if len(members) < 2:
            continue
        if any(explicit[i] for i in members):
            names = sorted({str(entries[i].path) for i in members})
            raise InvalidOption(f"slide id {base_ids[members[0]]!r} is given to several slides: "
                                f"{', '.join(names)}; make the slide_id column unique")
        root = _common_root(entries[i].path for i in members)
        for n in (8, 12, 16, 40):
            for i in members:
                rel = PurePosixPath(Path(os.path.abspath(entries[i].path)).relative_to(root)).as_posix()
                ids[i] = f"{base_ids[i]}-{_short_hash(rel, n)}"
            if len({ids[i].casefold() for i in members}) == len(members):
                break
    taken: dict[str, int] = {}
    for i, sid in enumerate(ids):
        other = taken.setdefault(sid.casefold(), i)
        if other != i:  # e.g. a file literally named like another slide's hashed id
            raise InvalidOption(f"slide id {sid!r} is used by both {entries[other].path} and {entries[i].path}; "
                                "rename one, or give ids in a --list CSV (slide_id column)")
    return [SlideJob(e.path, sid, e.mpp) for e, sid in zip(entries, ids)]


def _natural_id(path: Path) -> str:
    if path.suffix.lower() == ".dcm":  # a DICOM series is named by its folder
        return path.parent.name or slide_id_for(path)
    return slide_id_for(path)


def build_jobs(inputs: Sequence[str | os.PathLike] = (), list_file: str | os.PathLike | None = None,
               slide_mpp: float | None = None) -> list[SlideJob]:
    """Slides from files, directories and a list file, with unique stable ids (whole cohort)."""
    entries = collect(inputs, list_file, slide_mpp)
    if not entries:
        where = ", ".join([str(p) for p in inputs] + ([f"--list {list_file}"] if list_file else []))
        raise SlideNotFound(f"no slides found in {where or 'the inputs'}; "
                            f"looked for: {', '.join(sorted(SLIDE_EXTENSIONS))}")
    return assign_ids(entries)
