"""What is left to do for a slide whose store may already exist: the resume check every driver uses.

A complete encoder group counts as done only when

- it was made from the same slide file (fingerprint), and
- its weights are the ones this run would use: a group made with random weights is never done for
  a run with real weights, and a group whose weights file differs (sha256) from the one this run
  resolves is redone.

No torch and no slide decoding here: a rerun of a finished cohort stays quick.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import artefacts
from .jobs import SlideJob
from .slide import fingerprint
from .store import completed_encoders, group_name, store_path, unreadable_geometry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    todo: list[str] = field(default_factory=list)  # encoders to (re)compute
    note: str | None = None  # why complete groups are redone
    error: str | None = None  # the slide cannot be embedded into this store: fail it with this line
    rebuild: bool = False  # the whole store must be rebuilt (geometry damaged)
    cells: int = 0  # cells the existing store holds (from its root attrs)
    kept: str | None = None  # how complete groups left as they are differ from this run's asking

    @property
    def nothing_to_do(self) -> bool:
        return not self.todo and self.error is None

    @property
    def skip_note(self) -> str:
        """A skipped slide's note: ``complete``, and what of this run's asking its store does not follow."""
        return "complete" if self.kept is None else f"complete ({self.kept}; --overwrite redoes it)"


def _kept_differences(store: Path, names: Sequence[str], opts) -> str | None:
    """Output options a complete group is kept despite (they change no cell, so they never force a
    redo): the embedding dtype, and a precision asked for by name."""
    said = []
    for name in names:
        attrs = _group_encoder_attrs(store, name)
        if attrs.get("dtype") and attrs["dtype"] != opts.dtype:
            said.append(f"its {name} embeddings are {attrs['dtype']}, asked --dtype {opts.dtype}")
        if opts.precision != "auto" and attrs.get("precision") and attrs["precision"] != opts.precision:
            said.append(f"its {name} embeddings were computed in {attrs['precision']}, asked --precision "
                        f"{opts.precision}")
    return "; ".join(said) or None


@dataclass(frozen=True)
class ExpectedWeights:
    random: bool
    sha256: str | None  # None: not known without loading (a download, timm's hub)
    spec: str = ""  # --weights as given


def expected_weights(model: str, weights: str) -> ExpectedWeights:
    """The weights ``--weights`` would give ``model``, as far as known without loading anything."""
    from .encoders.fetch import find_published, sha256_file, url_cache_path
    from .encoders.registry import get_config

    spec = str(weights or "").strip()
    if spec.lower() == "random":
        return ExpectedWeights(True, None, spec)
    path: Path | None = None
    if spec.lower() == "auto":
        if not model.startswith("timm:"):
            found = find_published(get_config(model))
            path = found[1] if found else None
    elif spec.lower().startswith(("http://", "https://")):
        published = None if model.startswith("timm:") else get_config(model)
        if published is not None and spec == published.weights_url:
            found = find_published(published)
            path = found[1] if found else None
        else:
            path = url_cache_path(spec)
    else:
        path = Path(spec).expanduser()
    sha = sha256_file(path) if path is not None and path.is_file() else None
    return ExpectedWeights(False, sha, spec)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _group_encoder_attrs(store: Path, name: str) -> dict:
    return _read_json(store / group_name(name) / "zarr.json").get("attributes", {}).get("encoder", {})


def _stale_weights(store: Path, name: str, expected: ExpectedWeights) -> str | None:
    """Why the complete group ``name`` does not hold this run's weights, or None."""
    if expected.random:
        return None  # a smoke test never replaces embeddings that exist
    attrs = _group_encoder_attrs(store, name)
    if attrs.get("weights_random"):
        return f"its {name} embeddings were made with random weights"
    have = attrs.get("weights_sha256")
    if expected.sha256 and have and have != expected.sha256:
        return f"its {name} embeddings were made with other weights (sha256 {have[:12]}, now {expected.sha256[:12]})"
    if expected.sha256 is None and not _same_request(attrs, expected.spec):
        # which file this run's weights are is known only once fetched: the request itself must match
        return (f"its {name} embeddings were made with --weights {attrs.get('weights_spec') or '?'}, "
                f"asked --weights {expected.spec}")
    return None


def _same_request(attrs: dict, spec: str) -> bool:
    """Whether a group's recorded weights answer ``--weights spec`` when its file is not here to hash:
    ``auto`` again (the published or timm-hosted file), or the very URL they came from."""
    if spec.lower() == "auto":
        return str(attrs.get("weights_spec") or "").lower() == "auto"
    return spec in (attrs.get("weights_url"), attrs.get("weights_spec"))


def options_conflict(store: Path, attrs: dict, job: SlideJob, opts) -> str | None:
    """Why a store cannot stand for this run's ``opts``: another grid, or other tissue options (the
    user's mask or annotations, pen marks, artefact drops). Options a store predates are not
    compared, so stores made by earlier versions keep resuming."""
    import math

    from .masks import ANNOTATION_SUFFIXES, MASK_SUFFIXES, resolve

    g, tissue = dict(attrs.get("grid", {})), dict(attrs.get("tissue", {}))
    wanted = (opts.grid.mpp, opts.grid.patch_px, opts.grid.stride, opts.min_tissue)
    have = (g.get("target_mpp"), g.get("patch_px"), g.get("stride_px"), tissue.get("min_tissue"))
    if None in have or not all(math.isclose(a, b) for a, b in zip(wanted, have)):
        return (f"{store}: exists with another grid (mpp, patch, stride, min-tissue = {have}, asked {wanted}); "
                "use --overwrite to rebuild it or choose another --out")
    slide = dict(attrs.get("slide", {}))
    if slide.get("mpp_source"):  # the slide's pixel size sets the grid as much as --mpp does
        was = slide.get("mpp") if slide["mpp_source"] == "override" else None
        now = job.slide_mpp
        if (was is None) != (now is None) or (now is not None and not math.isclose(float(was), now, rel_tol=1e-6)):
            said = f"--slide-mpp {was:g}" if was is not None else f"the slide's own {slide.get('mpp') or '?'} µm/px"
            asked_for = f"--slide-mpp {now:g}" if now is not None else "the slide's own pixel size"
            return (f"{store}: exists with another slide pixel size ({said}, asked {asked_for}); "
                    "use --overwrite to rebuild it, or choose another --out")
    differences = []
    if "pen_marks" in tissue and tissue["pen_marks"] != opts.tissue.pen_marks:
        differences.append(f"--pen-marks {tissue['pen_marks']}")

    def asked(spec, suffixes, what) -> str | None:
        try:
            path = resolve(spec, job.slide_id, suffixes, what)
        except OSError:  # missing: the run itself says so when it prepares the slide
            return "?"
        return None if path is None else str(Path(path).resolve())

    if "mask_path" in tissue:
        mask = asked(job.tissue_mask or opts.tissue_mask, MASK_SUFFIXES, "tissue mask")
        if mask != tissue["mask_path"] and mask != "?":
            differences.append(f"tissue mask {tissue['mask_path'] or 'detected'}")
    if "annotations" in tissue:
        ann = tissue["annotations"] if isinstance(tissue["annotations"], dict) else {}
        path = asked(job.annotations or opts.annotations, ANNOTATION_SUFFIXES, "annotation file")
        kept = tuple(ann.get("kept_classes") or ()) or None
        if (path != ann.get("path") and path != "?") or (path and kept != (tuple(opts.annotation_classes or ()) or None)):
            differences.append(f"annotations {ann.get('path') or 'none'} (classes {', '.join(kept) if kept else 'all'})")
    art = tissue.get("artefacts")
    if isinstance(art, dict):
        for key in artefacts.OPTION_KEYS:
            if key in art and art[key] != getattr(opts, key):
                differences.append(f"{key.replace('_', '-')} {art[key]}")
    if differences:
        return (f"{store}: exists with other tissue options ({'; '.join(differences)}); use --overwrite to "
                "rebuild it with these, or choose another --out")
    return None


def plan_resume(out_dir: Path, job: SlideJob, names: Sequence[str], weights: str, *,
                overwrite: bool = False, verify: bool = False, options=None) -> Resume:
    """Which of ``names`` still have to be computed for ``job`` in ``out_dir``."""
    names = list(names)
    if overwrite:
        return Resume(names)
    store = store_path(out_dir, job.slide_id)
    done = set(completed_encoders(store)) if store.is_dir() else set()
    if not done & set(names):
        return Resume(names)
    if not job.path.exists():
        return Resume(error=f"{job.path}: no such file; check the path (a store for {job.slide_id} exists "
                            f"at {store})")
    root_attrs = _read_json(store / "zarr.json").get("attributes", {})
    recorded = root_attrs.get("slide", {})
    try:
        same_file = recorded.get("fingerprint") == fingerprint(job.path)
    except OSError as exc:
        return Resume(error=f"{job.path}: cannot be read ({exc.strerror or exc}); check the file")
    if not same_file:
        if recorded.get("path") and Path(recorded["path"]).resolve() == job.path.resolve():
            return Resume(error=(f"{job.path}: has changed since the store {store} was made from it; "
                                 "use --overwrite to embed it again"))
        return Resume(error=(
            f"{job.path}: the store {store} was made from another file ({recorded.get('path')}); "
            "use --overwrite to replace it, or give this slide its own id with --list and a slide_id column"))
    conflict = options_conflict(store, root_attrs, job, options) if options is not None else None
    if conflict:
        return Resume(error=conflict)
    try:
        broken = unreadable_geometry(store)
    except OSError as exc:
        return Resume(error=f"{store}: cannot be read ({exc.strerror or exc}); check the disk, then rerun")
    if broken:  # neither skipped nor rebuilt here: a rebuild with this run's encoders would drop the others
        return Resume(error=f"{store}: damaged ({', '.join(broken)} metadata cannot be read); "
                            f"repair it with: wsi-embed verify {store} --repair")
    todo, notes = [n for n in names if n not in done], []
    lost = [n for n in todo if (store / group_name(n)).is_dir()]  # a group there, but unreadable or unfinished
    if lost:
        notes.append(f"its {', '.join(lost)} group{'s' if len(lost) > 1 else ''} could not be read as complete")
    for name in names:
        if name in done:
            why = _stale_weights(store, name, expected_weights(name, weights))
            if why:
                todo.append(name)
                notes.append(why)
    rebuild = False
    if verify and len(todo) < len(names):
        from .verify import verify_store

        report = verify_store(store)
        if not report.ok:
            damaged = [n for n in names if n not in todo and (report.geometry_damaged or n in report.damaged_encoders)]
            if damaged:
                todo += damaged
                notes.append(f"its store is damaged ({report.summary()})")
            rebuild = report.geometry_damaged
    todo = [n for n in names if n in todo]  # keep the run's order
    cells = int(root_attrs.get("tissue", {}).get("cells_embedded") or 0)
    kept = _kept_differences(store, names, options) if not todo and options is not None else None
    return Resume(todo, "; ".join(notes) or None, rebuild=rebuild, cells=cells, kept=kept)
