"""Finding a cohort's slides and giving each a unique, stable slide id.

Inputs are files (used as they are), directories (searched recursively by extension) and list
files (``--list``: TXT with one path per line, or CSV with a ``path`` column and optional ``mpp``
and ``slide_id`` columns). Ids are computed over the whole cohort, before any sharding, so every
shard and every rerun maps a slide to the same store.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from ..errors import InvalidOption, SlideNotFound
from ..ids import clean_natural_id, has_tmp_mark
from ..jobs import SlideJob, slide_id_for
from ..slide import check_slide_mpp
from ..dicom import DicomSeries, dicom_candidate_name, dicom_series, is_dicom_file

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
    tissue_mask: Path | None = None  # list columns tissue_mask, annotations (relative: to the list)
    annotations: Path | None = None


def is_slide_file(path: Path) -> bool:
    name = path.name
    if name.startswith("."):  # hidden files, and macOS "._x.svs" resource forks
        return False
    return path.suffix.lower().lstrip(".") in SLIDE_EXTENSIONS


PLAIN_IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
OUR_PICTURES = (".qc.png", ".map.png", ".clusters.png", ".attention.png")  # an --out inside the input folder


def find_slides(directory: Path, images: list[Path] | None = None) -> list[Path]:
    """Slide files under ``directory``, recursively, sorted. A DICOM series (files of one
    SeriesInstanceUID, one per level: ``.dcm``, or without extension and found by their DICM
    magic) counts once, by its main file: OpenSlide finds the rest. A folder holding several
    series gives one slide per series (ids: see :func:`dicom_slide_id`). ``images``: plain
    pictures found on the way (PNG, JPEG, ...), which are not slides, are added to it."""
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
        found.extend(sorted(Path(root, f) for f in files
                            if is_slide_file(Path(f)) and not f.lower().endswith(".dcm")))
        if images is not None:
            images.extend(Path(root, f) for f in files
                          if f.lower().endswith(PLAIN_IMAGES) and not f.lower().endswith(OUR_PICTURES))
        dicom_names = [f for f in files if dicom_candidate_name(f)]  # .dcm, or no/numeric extension
        if dicom_names:  # extensionless files cost a 132-byte read (DICM magic), .dcm files none
            found.extend(sorted(s.main_file for s in dicom_series(Path(root), dicom_names)))
    return found


def dicom_slide_id(path: Path) -> str | None:
    """The natural id of a DICOM slide, or None when ``path`` is not a DICOM file: the name of its
    folder, plus ``-`` and 8 hex digits of the sha1 of its SeriesInstanceUID when that folder
    holds several series (the same whichever file of the series is named)."""
    path = Path(path)
    if not is_dicom_file(path):
        return None
    folder = Path(os.path.abspath(path)).parent
    name = folder.name or slide_id_for(path)
    try:
        series = _folder_series(str(folder), os.stat(folder).st_mtime_ns)
    except OSError:
        return name
    if len(series) < 2:
        return name
    for s in series:
        if any(os.path.samefile(f, path) for f in s.files):
            return f"{name}-{_short_hash(s.uid or s.files[0].name)}"
    return name


@functools.lru_cache(maxsize=64)
def _folder_series(folder: str, mtime_ns: int) -> tuple[DicomSeries, ...]:
    """A folder's DICOM series, cached while the folder is unchanged (ids ask once per slide)."""
    return tuple(dicom_series(Path(folder)))


def _float_or_none(value: str | None, where: str) -> float | None:
    if value is None or not value.strip():
        return None
    return check_slide_mpp(value, f"{where}: mpp")


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
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    first_line = lines[0][1]
    delim = "\t" if "\t" in first_line and "," not in first_line else ","
    header = [h.strip().lower() for h in next(csv.reader([first_line], delimiter=delim))]
    if "path" not in header:
        _refuse_a_header_without_path(list_file, first_line)
        return [SlideEntry(_resolve(base, ln.strip())) for _, ln in lines]
    entries = []
    for n, line in lines[1:]:
        where = f"{list_file}, line {n}"
        fields = [f.strip() for f in next(csv.reader([line], delimiter=delim))]
        if not any(fields):  # ",,": a row a spreadsheet left empty
            continue
        if any(fields[len(header):]):
            raise InvalidOption(f"{where}: {len(fields)} fields, but the header has {len(header)} columns; "
                                "quote a path that holds a comma")
        row = dict(zip(header, fields))
        if not row.get("path"):
            raise InvalidOption(f"{where}: no path; give each row's slide file in the 'path' column "
                                "(or remove the row)")
        entries.append(SlideEntry(_resolve(base, row["path"]), _float_or_none(row.get("mpp"), where),
                                  row.get("slide_id") or row.get("id") or None,
                                  _resolve(base, row["tissue_mask"]) if row.get("tissue_mask") else None,
                                  _resolve(base, row["annotations"]) if row.get("annotations") else None))
    return entries


_HEADER_WORDS = {"path", "mpp", "slide_id", "id", "tissue_mask", "annotations", "slide", "file", "filename",
                 "filepath", "file_path", "slide_path", "image", "image_path"}


def _refuse_a_header_without_path(list_file: Path, first_line: str) -> None:
    """A first line that reads as a CSV header, but without a 'path' column (another name, or
    another separator), would otherwise become a slide path itself."""
    words = [w.strip().lower() for w in re.split(r"[,;\t]", first_line)]
    if len(words) < 2 or not _HEADER_WORDS.intersection(words):
        return
    if any("/" in w or "\\" in w or re.search(r"\.[a-z0-9]{2,5}$", w) for w in words):
        return  # a path with a comma in it (a TXT list), not a header
    if ";" in first_line and "path" in words:
        raise InvalidOption(f"{list_file}: the slide list is separated by semicolons; separate its columns "
                            "with commas (or tabs)")
    raise InvalidOption(f"{list_file}: a CSV slide list needs a 'path' column (its header is {first_line.strip()!r}); "
                        "name the column of slide files 'path'")


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
        raw += [SlideEntry(e.path, e.mpp if e.mpp is not None else slide_mpp, e.slide_id, e.tissue_mask,
                           e.annotations) for e in read_list(list_file)]
    entries: list[SlideEntry] = []
    seen: set[str] = set()
    empty: list[Path] = []
    for entry in raw:
        if entry.path.is_dir():
            images: list[Path] = []
            found = find_slides(entry.path, images)
            if images:
                log.warning("%s: %d plain image file(s) left out (e.g. %s): not whole-slide images; convert them "
                            "to pyramidal TIFF (with their resolution, or pass --slide-mpp) to embed them",
                            entry.path, len(images), images[0].name)
            if not found:
                empty.append(entry.path)
            expanded = [SlideEntry(p, entry.mpp) for p in found]
        else:
            expanded = [entry]
        for e in expanded:
            key = os.path.realpath(e.path)
            if key in seen:  # the same file through two inputs (DIR and DIR/x.svs) is one slide
                continue
            seen.add(key)
            entries.append(e)
    if entries:  # with nothing found at all, the caller's error says it once
        for folder in empty:
            log.warning("%s: no slide files found (extensions: %s)", folder, ", ".join(sorted(SLIDE_EXTENSIONS)))
    return entries


def _common_root(paths: Iterable[Path]) -> Path:
    absolute = [os.path.abspath(p) for p in paths]
    return Path(os.path.commonpath(absolute)) if len(absolute) > 1 else Path(absolute[0]).parent


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def assign_ids(entries: Sequence[SlideEntry], out_dir: str | os.PathLike | None = None) -> list[SlideJob]:
    """One :class:`SlideJob` per entry, with unique ids.

    The id is the file name without its extension (DICOM: the series folder's name), with
    ``.tmp-`` changed to ``_tmp-`` (that mark names the tool's temporaries, see :mod:`wsi_embed.ids`).
    Where several slides share a name, each gets ``<name>-<hash>``, the hash being of its path
    relative to the common folder of those same-named slides: it does not depend on input order,
    on the other slides of the run, or on where the cohort is mounted. Ids are compared
    case-insensitively (stores must not clash on case-insensitive file systems).

    With ``out_dir``, a slide keeps the id its store already has there: when ``<out>/<name>.zarr``
    exists and was made from one of the same-named slides (its recorded path, else its
    fingerprint), that slide keeps the plain ``<name>`` and only the others are hashed. So a cohort
    that grows (``siteA`` first, ``siteA`` and ``siteB`` later) re-embeds nothing. Every shard sees
    the same ``out_dir`` at the start (this run only creates hashed stores for shared names), so
    shards agree.

    Ids too long for a file name are not refused here: they fail their slide alone
    (:func:`wsi_embed.ids.id_problem`).
    """
    base_ids = [e.slide_id or _natural_id(e.path) for e in entries]
    explicit = [e.slide_id is not None for e in entries]
    for entry, sid in zip(entries, base_ids):
        if not sid or sid.startswith(".") or any(c in sid for c in '/\\\0'):
            raise InvalidOption(f"slide id {sid!r} for {entry.path} cannot name a store (no '/', '\\', "
                                "leading '.' or empty ids); fix the slide_id column or rename the file")
        if has_tmp_mark(sid):  # only explicit ids can get here: natural ones were cleaned
            raise InvalidOption(f"slide id {sid!r} for {entry.path} contains '.tmp-', which names wsi-embed's "
                                "temporary files; change it in the slide_id column (e.g. '_tmp-')")
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
        keeper = _store_owner(entries, base_ids, members, Path(out_dir)) if out_dir is not None else None
        if keeper is not None:
            log.info("%s keeps the id %r of its store in %s", entries[keeper].path, base_ids[keeper], out_dir)
        root = _common_root(entries[i].path for i in members)
        for n in (8, 12, 16, 40):
            for i in members:
                if i == keeper:
                    continue
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
    return [SlideJob(e.path, sid, e.mpp, e.tissue_mask, e.annotations) for e, sid in zip(entries, ids)]


def _recorded_slide(store: Path) -> dict | None:
    """The ``slide`` attrs of an existing store (its root zarr.json, read as JSON: cheap), or None."""
    try:
        meta = json.loads((store / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    slide = meta.get("attributes", {}).get("slide") if isinstance(meta, dict) else None
    return slide if isinstance(slide, dict) else None


def _same_file(path: Path, recorded: str) -> bool:
    candidates = {os.path.abspath(path), os.path.realpath(path)}
    # A DICOM series may be recorded by its folder (a slide file never is)
    candidates |= {os.path.dirname(c) for c in tuple(candidates)}
    return recorded in candidates


def _fingerprint(path: Path) -> str | None:
    from ..slide import fingerprint

    try:
        return fingerprint(path)
    except OSError:
        return None


def _store_owner(entries: Sequence[SlideEntry], base_ids: Sequence[str], members: Sequence[int],
                 out_dir: Path) -> int | None:
    """Which of the same-named ``members`` an existing ``<out>/<name>.zarr`` was made from, if any.

    Its recorded path decides (no file is read); else its fingerprint (first and last MiB of each
    candidate; identical copies: the first path in sorted order). A store made from a file that is
    not in this run names nobody: every member is hashed, as without ``out_dir``.
    """
    for name in sorted({base_ids[i] for i in members}):
        recorded = _recorded_slide(out_dir / f"{name}.zarr")
        if recorded is None:
            continue
        named = [i for i in members if base_ids[i] == name]
        path = recorded.get("path")
        if isinstance(path, str) and path:
            by_path = [i for i in named if _same_file(entries[i].path, path)]
            if len(by_path) == 1:
                return by_path[0]
        fp = recorded.get("fingerprint")
        if isinstance(fp, str) and fp:
            by_fp = [i for i in named if _fingerprint(entries[i].path) == fp]
            if by_fp:
                return min(by_fp, key=lambda i: str(entries[i].path))
    return None


def _natural_id(path: Path) -> str:
    dicom = dicom_slide_id(path)  # a DICOM series is named by its folder (and series, if several)
    if dicom is not None:
        return clean_natural_id(dicom)
    return clean_natural_id(slide_id_for(path))


def build_jobs(inputs: Sequence[str | os.PathLike] = (), list_file: str | os.PathLike | None = None,
               slide_mpp: float | None = None, out_dir: str | os.PathLike | None = None) -> list[SlideJob]:
    """Slides from files, directories and a list file, with unique stable ids (whole cohort).

    ``out_dir``: the run's output folder, so slides keep the ids their stores have there
    (see :func:`assign_ids`)."""
    entries = collect(inputs, list_file, slide_mpp)
    if not entries:
        where = ", ".join([str(p) for p in inputs] + ([f"--list {list_file}"] if list_file else []))
        named_like_slides = [str(p) for p in inputs if Path(p).is_dir() and is_slide_file(Path(p))]
        hint = (f"; {', '.join(named_like_slides)}: a folder named like a slide file, holding none; give the slide "
                "file itself" if named_like_slides else "")
        raise SlideNotFound(f"no slides found in {where or 'the inputs'}; "
                            f"looked for: {', '.join(sorted(SLIDE_EXTENSIONS))}{hint}")
    return assign_ids(entries, out_dir)
