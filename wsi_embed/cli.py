"""The ``wsi-embed`` command. Thin: parse options, call the library, print results."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from .errors import WeightsUnavailable, WsiEmbedError

EXIT_FAILED, EXIT_WEIGHTS_UNAVAILABLE = 1, 3

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Whole-slide images in, per-slide embedding grids (Zarr v3) out.")

RANDOM_BANNER = """\
================================================================================
  RANDOM WEIGHTS: the encoder is randomly initialised. These embeddings are
  meaningless for research; use them only to try the pipeline. The store
  records weights_random = true.
================================================================================"""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:  # readers' own chatter about damaged files; our error line says it plainly
        for name in ("tifffile", "asyncio"):  # tiffslide reads tiles through zarr's asyncio loop
            logging.getLogger(name).setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
        # after a decode error, tiffslide's pending zarr coroutines are collected at exit and
        # Python would print their tracebacks; the error line already said what happened
        sys.unraisablehook = lambda u: logging.getLogger(__name__).debug("cleanup: %r", u.exc_value)


def _folder_option(name: str, value: str) -> Path:
    """An empty folder name (an unset shell variable) would mean the current folder: refused."""
    if not value.strip():
        raise typer.BadParameter("is empty; name the output folder (e.g. --out out)", param_hint=name)
    return Path(value)


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _os_failure(exc: OSError) -> None:
    """A file the command had to write or read could not be (permissions, a full disk, a missing folder)."""
    _fail(f"{exc.filename or 'a file'}: {exc.strerror or exc}; check the path, its permissions and free space")


@app.command()
def info(slide: Path = typer.Argument(..., help="Slide file, or a folder holding one DICOM series."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
         backend: str = typer.Option("auto", help="auto | openslide | tiffslide"),
         slide_mpp: Optional[float] = typer.Option(
             None, help="µm/px of the slide; overrides the file's resolution, as in embed.")):
    """Level-0 size, levels, downsamples, mpp and its source (as embed would use them), vendor and
    objective power."""
    from .errors import MissingMpp, SlideOutOfLimits
    from .slide import describe, ensure_intact, open_slide, resolve_mpp

    _setup_logging(False)
    try:
        with open_slide(slide, backend=backend) as s:
            ensure_intact(s.path)  # a DICOM folder opens through one of its files
            try:
                mpp, mpp_problem = resolve_mpp(s, slide_mpp), None  # exactly what embed would use
            except (MissingMpp, SlideOutOfLimits) as exc:  # still describe the slide; embed would fail
                mpp, mpp_problem = None, str(exc).removeprefix(f"{s.path}: ")
            d = describe(s, mpp).to_dict()
    except WsiEmbedError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({**d, "mpp_problem": mpp_problem}, indent=2))
        return
    typer.echo(f"slide            {d['path']}")
    typer.echo(f"backend          {d['backend']}  vendor {d['vendor'] or '-'}")
    typer.echo(f"level-0 size     {d['dimensions'][0]} x {d['dimensions'][1]} px")
    mpp_text = f"{d['mpp']:.4f} µm/px ({d['mpp_source']})" if d["mpp"] else f"none: {mpp_problem}"
    typer.echo(f"mpp              {mpp_text}")
    typer.echo(f"objective power  {d['objective_power'] or '-'}")
    typer.echo(f"levels           {d['level_count']}")
    for i, ((w, h), ds) in enumerate(zip(d["level_dimensions"], d["level_downsamples"])):
        typer.echo(f"  level {i}: {w} x {h} px, downsample {ds:.4g}")


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")):
    """The named encoders: architecture, dim, input, normalization, weights and licence."""
    from .encoders import models_table

    rows = models_table()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        cached = {True: "cached", False: "not cached", None: "?"}[r.get("cached")]
        typer.echo(f"{r['name']:<20} {r['architecture']}  dim {r['dim']}  input {r['input_size']}px")
        typer.echo(f"{'':<20} mean {r['mean']} std {r['std']}")
        typer.echo(f"{'':<20} weights {r.get('weights_url') or r.get('weights_file') or '-'} [{cached}]")
        typer.echo(f"{'':<20} licence: {r['licence']}")
    typer.echo("Any timm model: --model timm:<name> (its pretrained_cfg mean/std/input size).")


@app.command()
def embed(
    slides: Optional[List[Path]] = typer.Argument(
        None, help="Slide files, or directories searched recursively for slides (svs, tif, ndpi, mrxs, ...)."),
    out: str = typer.Option(..., "--out", "-o", callback=lambda value: _folder_option("--out", value),
                            metavar="DIR", help="Output directory; one <slide_id>.zarr per slide."),
    slide_list: Optional[Path] = typer.Option(
        None, "--list", help="CSV (columns path[, mpp, slide_id, tissue_mask, annotations]) or TXT (one path per line) of slides."),
    model: str = typer.Option("lunit-bt-rn50", "--model", "-m",
                              help="Encoder name(s), comma-separated (see `wsi-embed models`)."),
    weights: str = typer.Option("auto", help="auto | random | PATH | URL"),
    mpp: float = typer.Option(0.5, help="Target resolution, µm/px."),
    patch_size: int = typer.Option(224, help="Patch side in pixels at the target resolution."),
    stride: Optional[int] = typer.Option(None, help="Grid step in pixels at the target resolution (default: patch size)."),
    min_tissue: float = typer.Option(0.25, help="Embed cells whose tissue fraction is at least this."),
    pen_marks: str = typer.Option("remove", help="Marker ink (blue, green, red, black): remove it from the tissue, "
                                                 "or keep it (still measured and drawn on the QC picture)."),
    tissue_mask: Optional[Path] = typer.Option(
        None, help="Binary PNG/TIFF mask (any scale, non-zero = tissue) replacing tissue detection, or a folder "
                   "of <slide_id>.png|.tif|.tiff. A --list column tissue_mask wins."),
    annotations: Optional[Path] = typer.Option(
        None, help="GeoJSON (QuPath, TRIDENT; level-0 px), or a folder of <slide_id>.geojson|.json: embed only "
                   "cells whose centre is inside a polygon. A --list column annotations wins."),
    annotation_classes: Optional[str] = typer.Option(
        None, help="Keep only annotations of these classes, comma-separated (e.g. tumor,stroma; any case)."),
    drop_blank: bool = typer.Option(False, "--drop-blank", help="Drop near-uniform cells (grey-level std under "
                                                                "--blank-threshold)."),
    drop_blurry: bool = typer.Option(False, "--drop-blurry", help="Drop out-of-focus cells (Laplacian variance "
                                                                  "under --blur-threshold)."),
    blank_threshold: float = typer.Option(8.0, help="Grey-level std (0-255) under which a cell is blank."),
    blur_threshold: float = typer.Option(50.0, help="Laplacian variance (grey 0-255, at the level read) under "
                                                    "which a cell is blurry."),
    slide_mpp: Optional[float] = typer.Option(
        None, help="The slides' resolution in µm/px; overrides what the files say (0.05-100)."),
    backend: str = typer.Option("auto", help="auto | openslide | tiffslide"),
    workers: Optional[int] = typer.Option(None, help="Loader worker processes (default: one per core up to 16 on GPU; on CPU 0 below 8 cores, else cores // 8)."),
    batch_size: int = typer.Option(64, help="Patches per encoder batch."),
    prepare_processes: Optional[int] = typer.Option(
        None, help="Processes that plan slides ahead (thumbnail, tissue, grid), so planning never shares the "
                   "GIL with the thread feeding the device (default: 2 on a GPU host with 8+ cores, else 1; 0: in a thread)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    decode: str = typer.Option("auto", help="JPEG tiles: auto (on the GPU with CUDA, else CPU) | cpu | gpu"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)"),
    dtype: str = typer.Option("float16", help="Stored embedding dtype: float16 | float32"),
    overwrite: bool = typer.Option(False, help="Redo slides whose stores are already complete."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder (CUDA)."),
    shard: Optional[str] = typer.Option(
        None, help="Embed one part of the cohort: i/N (0 <= i < N), or 'slurm' in a SLURM job array."),
    manifest: Optional[Path] = typer.Option(
        None, help="Run manifest, one row per slide (default <out>/manifest.csv; .jsonl for JSON lines)."),
    lock_stale_after: float = typer.Option(
        3600.0, help="Seconds after which a lock held by another host, not refreshed, counts as stale."),
    cluster: Optional[str] = typer.Option(
        None, help="Run with dask: 'local' (this machine), 'slurm' (dask-jobqueue) or a scheduler address."),
    cluster_workers: Optional[int] = typer.Option(
        None, min=1, help="dask workers: local CPU workers (default: cores) or SLURM jobs (default --slurm-jobs)."),
    cluster_config: Optional[Path] = typer.Option(
        None, help="JSON/YAML file of SLURM settings (queue, walltime, gres, cores, memory, jobs, account, ...)."),
    slurm_queue: Optional[str] = typer.Option(None, help="SLURM partition for --cluster slurm."),
    slurm_walltime: Optional[str] = typer.Option(None, help="SLURM time limit per job, HH:MM:SS."),
    slurm_gres: Optional[str] = typer.Option(None, help="SLURM generic resources per job, e.g. gpu:1."),
    slurm_cores: Optional[int] = typer.Option(None, min=1, help="CPUs per SLURM job."),
    slurm_memory: Optional[str] = typer.Option(None, help="Memory per SLURM job, e.g. 16GB."),
    slurm_jobs: Optional[int] = typer.Option(None, min=1, help="Number of SLURM jobs (dask workers)."),
    max_cells: Optional[int] = typer.Option(
        None, help="Refuse slides whose grid would have more cells than this (default 2,000,000: more than a "
                   "whole 40x resection; more means a wrong resolution tag)."),
    verify: bool = typer.Option(
        False, "--verify", help="Check the embeddings of complete stores before skipping them; redo damaged ones."),
    maps: bool = typer.Option(
        True, "--maps/--no-maps", help="After the run, draw <slide_id>.<encoder>.map.png (PCA of the embeddings as RGB, fitted on this run's slides)."),
    clusters: Optional[int] = typer.Option(
        None, "--clusters", min=2, max=20, help="Also draw <slide_id>.<encoder>.clusters.png: k-means with K clusters (2-20)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Embed slides: tissue detection, grid at --mpp, encoder, one Zarr store and QC picture per slide.

    Directories are searched recursively; reruns skip complete stores; a manifest row per slide
    goes to <out>/manifest.csv. Exit status 1 when any slide failed, 4 when none failed but some were
    locked by other runs, 3 when the published weights are unavailable."""
    _setup_logging(verbose)
    from .cohort import embed_cohort, parse_shard, plan_cohort
    from .cohort.dask_driver import SlurmSettings
    from .cohort.progress import Progress
    from .grid import GridSpec
    from .jobs import DEFAULT_MAX_CELLS, EmbedOptions, check_models
    from .slide import check_slide_mpp
    from .tissue import TissueParams

    from .store import check_out_dir, folders_to_make, remove_if_empty

    made = folders_to_make(out)
    try:
        options = EmbedOptions(
            grid=GridSpec(mpp=mpp, patch_px=patch_size, stride_px=stride), min_tissue=min_tissue,
            backend=backend, dtype=dtype, workers=workers, batch_size=batch_size, device=device,
            precision=precision, compile=compile, overwrite=overwrite, lock_stale_after=lock_stale_after,
            prepare_processes=prepare_processes,
            max_cells=DEFAULT_MAX_CELLS if max_cells is None else max_cells, verify=verify, decode=decode,
            tissue=TissueParams(pen_marks=pen_marks),
            tissue_mask=str(tissue_mask) if tissue_mask else None,
            annotations=str(annotations) if annotations else None,
            annotation_classes=tuple(c.strip() for c in annotation_classes.split(",") if c.strip())
            if annotation_classes is not None else None, drop_blank=drop_blank, drop_blurry=drop_blurry,
            blank_threshold=blank_threshold, blur_threshold=blur_threshold)
        models_ = [m.strip() for m in model.split(",") if m.strip()]
        if not models_:
            _fail(f"--model {model!r} names no model; see `wsi-embed models`")
        check_out_dir(out)
        if slide_mpp is not None:
            check_slide_mpp(slide_mpp)
        if not slides and slide_list is None:
            _fail("no slides given: pass slide files or directories, or --list FILE")
        slurm_given = [flag for flag, v in (("--cluster-config", cluster_config), ("--slurm-queue", slurm_queue),
                                            ("--slurm-walltime", slurm_walltime), ("--slurm-gres", slurm_gres),
                                            ("--slurm-cores", slurm_cores), ("--slurm-memory", slurm_memory),
                                            ("--slurm-jobs", slurm_jobs)) if v is not None]
        if slurm_given and cluster != "slurm":  # they would be ignored
            _fail(f"{', '.join(slurm_given)}: for --cluster slurm only; add it (or drop them)")
        if cluster_workers is not None and cluster is None:
            _fail("--cluster-workers is for dask runs; add --cluster local, --cluster slurm or --cluster ADDRESS "
                  "(or drop it)")
        jobs = plan_cohort(slides or [], slide_list, slide_mpp=slide_mpp, shard=parse_shard(shard), out_dir=out,
                           options=options)
        slurm = SlurmSettings.from_file(cluster_config) if cluster_config else SlurmSettings()
        slurm = slurm.merged(queue=slurm_queue, walltime=slurm_walltime, gres=slurm_gres, cores=slurm_cores,
                             memory=slurm_memory, jobs=slurm_jobs)
        if cluster is None:
            from .decode import check_decode
            from .infer import select_device, select_precision

            chosen = select_device(device)  # a device that is not there is said before anything else
            select_precision(precision, chosen)
            check_decode(decode, chosen)
        else:
            from .cohort.cluster import check_cluster

            check_cluster(cluster)
        if manifest is not None:
            from .cohort.manifest import Manifest

            Manifest(manifest).check_path()
        if cluster and not verbose:  # distributed sets its loggers to INFO when imported
            import distributed  # noqa: F401

            logging.getLogger("distributed").setLevel(logging.WARNING)
        check_models(models_, weights)  # last: a timm name imports timm (seconds), the checks above are instant
        if weights.strip().lower() == "random":
            typer.echo(RANDOM_BANNER, err=True)
        progress = Progress(len(jobs), slide_bar=cluster is None)  # dask reports whole slides only
        try:
            summary = embed_cohort(jobs, out, models_, weights, options, cluster=cluster, slurm=slurm,
                                   n_workers=cluster_workers, manifest=manifest,
                                   on_result=lambda r: progress.result(r, _result_lines(r)),
                                   progress=progress.cells)
        finally:
            progress.close()
    except WsiEmbedError as exc:
        remove_if_empty(made)  # a run that stopped before any slide leaves no empty --out behind
        _fail(str(exc), EXIT_WEIGHTS_UNAVAILABLE if isinstance(exc, WeightsUnavailable) else EXIT_FAILED)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the same, then main() says "interrupted"
        remove_if_empty(made)
        raise
    from .report import finish_run

    extras = finish_run(out, summary, maps=maps, clusters=clusters)  # never fails the run: warnings only
    if extras.report is not None:
        typer.echo(f"report: {extras.report}")
    written = summary.manifest is not None and Path(summary.manifest).exists()
    where = f"manifest {summary.manifest}" if written else "no manifest (no slide ran)"
    typer.echo(f"summary: {summary.line()}; {where}")
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


def _result_lines(result) -> list[str]:
    if result.status == "failed":
        return [f"error: {result.error}"]
    if result.status == "skipped":
        note = result.note or ""
        why = f"complete store at {result.store}{note[len('complete'):]}" if note.startswith("complete") else note
        return [f"skipped {result.slide_id}: {why}"]
    lines = [f"done    {result.slide_id}: {result.cells} cells in {result.seconds:.1f} s",
             f"        store {result.store}"]
    if result.note:  # complete groups that were redone, and why
        lines.append(f"        redone: {result.note}")
    if result.qc:
        lines.append(f"        qc    {result.qc}")
    return lines


@app.command()
def export(
    out: Path = typer.Argument(..., help="Output folder of wsi-embed embed (its *.zarr stores)."),
    format: str = typer.Option(..., "--format", help="trident | clam | stamp"),
    encoder: str = typer.Option(..., "--encoder", help="Model name (timm:test_vit) or group name (timm-test_vit)."),
    to: Path = typer.Option(..., "--to", help="Folder to write the export into."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Write complete stores in the layouts TRIDENT, CLAM or STAMP read. One line per slide and a
    summary; current files are skipped; exit status 1 when a slide failed."""
    _setup_logging(verbose)
    from .export import export as run_export

    try:
        summary = run_export(out, format=format, encoder=encoder, to=to,
                             on_result=lambda r: typer.echo(r.line()))
    except WsiEmbedError as exc:
        _fail(str(exc))
    typer.echo(f"summary: {summary.line()}")
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


@app.command()
def bench(
    target: Path = typer.Argument(..., help="A slide, or a directory of slides (per-slide overhead)."),
    model: str = typer.Option("lunit-bt-rn50", "--model", "-m"),
    weights: str = typer.Option("random", help="Speed does not depend on the weights: random by default."),
    batch_size: int = typer.Option(64),
    workers: Optional[int] = typer.Option(None, help="Loader processes for every phase (default: all cores for loader-only, the embed default otherwise)."),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("auto"),
    mpp: float = typer.Option(0.5),
    patch_size: int = typer.Option(224),
    max_patches: int = typer.Option(512, min=0, help="Patches for loader-only, model-only and the decode limit, and "
                                    "end-to-end on one slide (0: all); a folder's end-to-end embeds every slide whole "
                                    "(the sustained rate)."),
    naive_patches: int = typer.Option(128, min=0, help="Patches for the naive per-patch baseline (0: skip)."),
    compile: bool = typer.Option(False, "--compile"),
    decode: str = typer.Option("auto", help="JPEG tiles: auto | cpu | gpu (as for embed)."),
    slide_mpp: Optional[float] = typer.Option(
        None, "--slide-mpp", help="The slides' resolution in µm/px; overrides what the files say (0.05-100)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Loader-only, model-only and end-to-end patches/s, loader wait, peak RSS and GPU memory."""
    _setup_logging(False)
    from .bench import run_bench
    from .grid import GridSpec
    from .jobs import EmbedOptions

    try:
        if not target.exists():
            _fail(f"{target}: no such file or directory; check the path")
        if slide_mpp is not None:
            from .slide import check_slide_mpp

            check_slide_mpp(slide_mpp)
        opts = EmbedOptions(grid=GridSpec(mpp=mpp, patch_px=patch_size), workers=workers,
                            batch_size=batch_size, device=device, precision=precision, compile=compile,
                            decode=decode)
        result = run_bench(target, model=model, weights=weights, options=opts,
                           max_patches=max_patches or None, naive_patches=naive_patches, slide_mpp=slide_mpp)
    except WsiEmbedError as exc:
        _fail(str(exc), EXIT_WEIGHTS_UNAVAILABLE if isinstance(exc, WeightsUnavailable) else EXIT_FAILED)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "machine":
                typer.echo(f"{key:<28} {value}")
        typer.echo(f"{'machine':<28} {json.dumps(result['machine'])}")
    if result.get("slides_failed"):  # the figures hold for the other slides only
        for error in result.get("errors", []):
            typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_FAILED)


@app.command()
def index(
    out: Path = typer.Argument(..., help="Output folder of stores (the one passed to embed --out)."),
    encoder: str = typer.Option(..., "--encoder", "-e", help="Encoder to index (model name, or its group name)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Build <OUT>/index-<encoder>/: a slide index and a patch index over every embedded cell, for
    wsi-embed search. Prints the index path."""
    _setup_logging(verbose)
    from .search import build_index

    try:
        path = build_index(out, encoder)
    except WsiEmbedError as exc:
        _fail(str(exc))
    except OSError as exc:
        _os_failure(exc)
    typer.echo(str(path))


@app.command()
def search(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="An index folder made by wsi-embed index."),
    slide: Optional[str] = typer.Option(None, "--slide", help="Nearest slides to this slide id."),
    patch: Optional[str] = typer.Option(None, "--patch", help="Nearest patches to this cell: SLIDE_ID:ROW,COL."),
    image: Optional[Path] = typer.Option(None, "--image", help="Nearest patches to this PNG patch."),
    top_k: int = typer.Option(10, "--top-k", help="Number of hits."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    montage: Optional[Path] = typer.Option(None, "--montage", help="Draw the query beside its hits to this PNG."),
    weights: Optional[str] = typer.Option(
        None, help="For --image: where the stores' weights are now (default: as recorded in the index)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Nearest slides (--slide) or patches (--patch, --image), by cosine distance (1 - cos), nearest
    first. The query itself is never a hit."""
    _setup_logging(verbose)
    from .search import format_table
    from .search import search as run_search

    try:
        result = run_search(index_dir, slide=slide, patch=patch, image=image, top_k=top_k, weights=weights,
                            montage=montage)
    except WsiEmbedError as exc:
        _fail(str(exc))
    except OSError as exc:
        _os_failure(exc)
    typer.echo(json.dumps(result) if as_json else format_table(result))
    if montage is not None and not as_json:
        typer.echo(f"montage {montage}")


@app.command()
def verify(
    targets: List[Path] = typer.Argument(..., help="Output folders (every *.zarr in them) or single stores."),
    repair: bool = typer.Option(False, "--repair", help="Re-embed what is damaged, and only that; then check again."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = typer.Option("auto", help="For --repair: auto | cpu | cuda | cuda:N"),
    workers: Optional[int] = typer.Option(None, help="For --repair: loader worker processes (default as for embed)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Check stores: metadata, chunk checksums, an embedding at every embedded cell and NaN elsewhere,
    cell counts. One line per store and a summary; exit status 1 when a store is damaged (and not
    repaired). --repair re-embeds a damaged encoder group alone, or rebuilds a store whose geometry
    is damaged, with the options recorded in the store."""
    _setup_logging(verbose)
    from .jobs import EmbedOptions
    from .verify import find_stores, repair_store, verify_store

    try:
        stores = {}  # a store named twice (itself and its folder, or through a link) is checked once
        for store in (s for t in targets for s in find_stores(t, tidy=repair)):
            stores.setdefault(os.path.realpath(store), store)
        stores = list(stores.values())
        options = EmbedOptions(device=device, workers=workers)
    except WsiEmbedError as exc:
        _fail(str(exc))
    rows, n_ok, n_damaged, n_repaired, n_fixable = [], 0, 0, 0, 0
    for store in stores:
        doing = "cannot be read"
        try:
            report = verify_store(store)
            doing = "cannot be repaired"
            result = repair_store(store, options, report) if repair and not report.ok else None
        except WsiEmbedError as exc:
            n_damaged += 1
            rows.append({"store": str(store), "ok": False, "error": str(exc)})
            if not as_json:
                typer.echo(f"failed   {store}: {exc}")
            continue
        except OSError as exc:  # permissions, I/O errors: say so for this store, go on with the others
            n_damaged += 1
            rows.append({"store": str(store), "ok": False, "error": f"{doing} ({exc.strerror or exc})"})
            if not as_json:
                typer.echo(f"failed   {store}: {doing} ({exc.strerror or exc}); check permissions and free space")
            continue
        if report.ok:
            n_ok += 1
        elif result is not None and result.ok:
            n_repaired += 1
        else:
            n_damaged += 1
            n_fixable += not report.unrepairable
        rows.append(result.to_dict() if result is not None else report.to_dict())
        if not as_json:
            typer.echo(result.line() if result is not None else report.line())
    line = f"{len(stores)} stores: {n_ok} ok, {n_damaged + n_repaired} damaged"
    if repair:
        line += f", {n_repaired} repaired"
    elif n_fixable:
        line += "; rerun with --repair to re-embed what is damaged"
    elif n_damaged:
        line += "; --repair cannot fix these: see each store's line"
    if as_json:
        typer.echo(json.dumps({"stores": rows, "ok": n_ok, "damaged": n_damaged + n_repaired,
                               "repaired": n_repaired, "summary": line}, indent=2))
    else:
        typer.echo(f"summary: {line}")
    if n_damaged:
        raise typer.Exit(EXIT_FAILED)


@app.command("inspect")
def inspect_cmd(
    store: Path = typer.Argument(..., help="A store, <out>/<slide_id>.zarr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (keys slide, grid, tissue, encoders, consistency)."),
    maps: bool = typer.Option(False, "--maps", help="Also draw the store's embedding maps beside it (PCA fitted on this slide)."),
    clusters: Optional[int] = typer.Option(None, "--clusters", min=2, max=20,
                                           help="Also the k-means cluster map (implies --maps)."),
):
    """One store: slide, mpp and its source, grid, tissue, encoders (dim, dtype, weights, precision,
    decoder) and a consistency check (finite inside the mask, NaN outside, complete). Exit status 1
    when it is inconsistent."""
    _setup_logging(False)
    from .inspect import inspect_lines, inspect_store

    maps = maps or clusters is not None  # as for report: asking for clusters asks for the maps
    try:
        info = inspect_store(store)
        drawn = []
        if maps and info["consistency"]["ok"]:
            from .maps import write_maps

            result = write_maps([store], clusters=clusters, cohort=False)
            drawn = [str(p) for p in result.written]
            for problem in result.problems:
                typer.echo(f"warning: {problem}", err=True)
    except WsiEmbedError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({**info, **({"maps": drawn} if maps else {})}, indent=2))
    else:
        for line in inspect_lines(info):
            typer.echo(line)
        for path in drawn:
            typer.echo(f"map          {path}")
    if not info["consistency"]["ok"]:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def report(
    out: Path = typer.Argument(..., help="An output folder of wsi-embed embed."),
    attention: Optional[Path] = typer.Option(
        None, help="Folder of workflows/train_abmil.py output (its attention/<slide_id>.attention.png are shown)."),
    maps: bool = typer.Option(False, "--maps", help="First redraw every store's maps, one PCA per encoder fitted on the whole folder."),
    clusters: Optional[int] = typer.Option(None, "--clusters", min=2, max=20, help="With the maps: k-means cluster maps too."),
):
    """Write <out>/report.html: summary, failures with their fixes, a sortable, filterable table of
    slides with their QC pictures, maps and attention heatmaps. Self-contained; no network."""
    _setup_logging(False)
    from .report import rebuild

    try:
        extras = rebuild(out, maps=maps, clusters=clusters, attention=attention)
    except WsiEmbedError as exc:
        _fail(str(exc))
    except OSError as exc:
        _os_failure(exc)
    for text in extras.warnings:
        typer.echo(f"warning: {text}", err=True)
    if extras.maps:
        typer.echo(f"maps: {len(extras.maps)} written")
    typer.echo(f"report: {extras.report}")


def _help_from_docstrings(typer_app: typer.Typer) -> None:
    """Each command's docstring as its help, every paragraph on one line: Typer keeps a docstring's
    hard line breaks, which cut sentences in two at any terminal width."""
    import inspect as _inspect

    for command in typer_app.registered_commands:
        paragraphs = [" ".join(p.split()) for p in _inspect.cleandoc(command.callback.__doc__ or "").split("\n\n")]
        command.help, command.short_help = "\n\n".join(paragraphs), paragraphs[0]


_help_from_docstrings(app)


def _terminated(signum, frame) -> None:
    # SLURM time limits, scancel and preemption send SIGTERM: unwind like Ctrl-C so slide locks are
    # released and temporaries removed (a lock left by another host would block a rerun for a while).
    raise KeyboardInterrupt


def _interrupted_line(argv: list[str]) -> str:
    """Only ``embed`` keeps stores to resume from (a bench keeps none)."""
    command = next((a for a in argv[1:] if not a.startswith("-")), "")
    return "interrupted; completed stores are kept, rerun to resume" if command == "embed" else "interrupted"


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except KeyboardInterrupt:
        typer.echo(_interrupted_line(sys.argv), err=True)
        sys.exit(130)
    except SystemExit as exc:  # typer turns an interrupt into a silent exit 130
        if exc.code == 130:
            typer.echo(_interrupted_line(sys.argv), err=True)
        raise


if __name__ == "__main__":
    main()
