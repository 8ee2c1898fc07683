"""The ``wsi-embed`` command. Thin: parse options, call the library, print results."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import WeightsUnavailable, WsiEmbedError

EXIT_FAILED, EXIT_WEIGHTS_UNAVAILABLE = 1, 3

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def info(slide: Path = typer.Argument(..., help="Slide file."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
         backend: str = typer.Option("auto", help="auto | openslide | tiffslide"),
         slide_mpp: Optional[float] = typer.Option(None, help="µm/px to use when the slide has none.")):
    """Level-0 size, levels, downsamples, mpp and its source, vendor and objective power."""
    from .slide import describe, open_slide, resolve_mpp

    _setup_logging(False)
    try:
        with open_slide(slide, backend=backend) as s:
            try:
                mpp = resolve_mpp(s, slide_mpp)
            except WsiEmbedError:
                mpp = None  # info still describes a slide without resolution metadata
            d = describe(s, mpp).to_dict()
    except WsiEmbedError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"slide            {d['path']}")
    typer.echo(f"backend          {d['backend']}  vendor {d['vendor'] or '-'}")
    typer.echo(f"level-0 size     {d['dimensions'][0]} x {d['dimensions'][1]} px")
    mpp_text = f"{d['mpp']:.4f} µm/px ({d['mpp_source']})" if d["mpp"] else "unknown (pass --slide-mpp)"
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
    slides: List[Path] = typer.Argument(..., help="Slide files."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; one <slide_id>.zarr per slide."),
    model: str = typer.Option("lunit-bt-rn50", "--model", "-m",
                              help="Encoder name(s), comma-separated (see `wsi-embed models`)."),
    weights: str = typer.Option("auto", help="auto | random | PATH | URL"),
    mpp: float = typer.Option(0.5, help="Target resolution, µm/px."),
    patch_size: int = typer.Option(224, help="Patch side in pixels at the target resolution."),
    stride: Optional[int] = typer.Option(None, help="Grid step in pixels at the target resolution (default: patch size)."),
    min_tissue: float = typer.Option(0.25, help="Embed cells whose tissue fraction is at least this."),
    slide_mpp: Optional[float] = typer.Option(None, help="µm/px to use for slides without resolution metadata."),
    backend: str = typer.Option("auto", help="auto | openslide | tiffslide"),
    workers: Optional[int] = typer.Option(None, help="Loader worker processes (default: cores - 1)."),
    batch_size: int = typer.Option(64, help="Patches per encoder batch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)"),
    dtype: str = typer.Option("float16", help="Stored embedding dtype: float16 | float32"),
    overwrite: bool = typer.Option(False, help="Redo slides whose stores are already complete."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder (CUDA)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Embed slides: tissue detection, grid at --mpp, encoder, one Zarr store and QC picture per slide."""
    _setup_logging(verbose)
    from .grid import GridSpec
    from .pipeline import EmbedOptions, SlideJob, embed_slides, slide_id_for

    try:
        options = EmbedOptions(
            grid=GridSpec(mpp=mpp, patch_px=patch_size, stride_px=stride), min_tissue=min_tissue,
            backend=backend, dtype=dtype, workers=workers, batch_size=batch_size, device=device,
            precision=precision, compile=compile, overwrite=overwrite)
        models_ = [m.strip() for m in model.split(",") if m.strip()]
        if weights == "random":
            typer.echo(RANDOM_BANNER, err=True)
        jobs = [SlideJob(Path(p), slide_id_for(Path(p)), slide_mpp) for p in slides]
        failed = 0
        for result in embed_slides(jobs, out, models_, weights, options):
            if result.status == "failed":
                failed += 1
                typer.echo(f"error: {result.error}", err=True)
            elif result.status == "skipped":
                typer.echo(f"skipped {result.slide_id}: complete store at {result.store}")
            else:
                typer.echo(f"done    {result.slide_id}: {result.cells} cells in {result.seconds:.1f} s")
                typer.echo(f"        store {result.store}")
                if result.qc:
                    typer.echo(f"        qc    {result.qc}")
    except WeightsUnavailable as exc:
        _fail(str(exc), EXIT_WEIGHTS_UNAVAILABLE)
    except WsiEmbedError as exc:
        _fail(str(exc))
    if failed:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; completed stores are kept, rerun to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
