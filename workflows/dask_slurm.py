#!/usr/bin/env python
"""Embed a cohort with dask on SLURM, from a login node (or any host that can run sbatch).

Starts a dask scheduler here and SLURM jobs that each run one dask worker (one slide at a time,
the encoders loaded once per worker); the manifest is written here as slides finish. Equivalent to
``wsi-embed embed SLIDES --out OUT --cluster slurm ...``; this file shows the public API, to copy
and adapt (other options, another cohort layout, several output folders).

    python workflows/dask_slurm.py /data/cohort --out /scratch/emb --model lunit-dino-vits16 \\
        --jobs 8 --queue gpu --gres gpu:1 --cores 8 --memory 32GB --walltime 12:00:00

Settings may also come from a JSON/YAML file (``--config``, keys as the options below plus any
SLURMCluster keyword, e.g. ``account``) or from dask's own ``jobqueue.slurm`` config. Keep this
process alive until it prints the summary (run it in tmux/screen, or as a small SLURM job itself).
"""

from __future__ import annotations

import argparse
import logging
import sys

from wsi_embed import EmbedOptions, WsiEmbedError
from wsi_embed.cohort import plan_cohort
from wsi_embed.cohort.dask_driver import SlurmSettings, run_cohort_dask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slides", nargs="*", help="slide files or directories (searched recursively)")
    p.add_argument("--list", dest="list_file", help="CSV/TXT list of slides")
    p.add_argument("--out", required=True, help="output directory, visible from every node")
    p.add_argument("--model", default="lunit-bt-rn50", help="encoder name(s), comma-separated")
    p.add_argument("--weights", default="auto", help="auto | PATH | URL | random")
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--device", default="auto")
    p.add_argument("--config", help="JSON/YAML file of SLURM settings")
    p.add_argument("--jobs", type=int, help="SLURM jobs, one dask worker each")
    p.add_argument("--queue", help="partition")
    p.add_argument("--walltime", help="HH:MM:SS per job")
    p.add_argument("--gres", help="e.g. gpu:1")
    p.add_argument("--cores", type=int, help="CPUs per job")
    p.add_argument("--memory", help="memory per job, e.g. 32GB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import distributed  # noqa: F401  (it sets its loggers to INFO when imported)

    logging.getLogger("distributed").setLevel(logging.WARNING)

    from wsi_embed.grid import GridSpec

    try:
        jobs = plan_cohort(args.slides, args.list_file)
        settings = SlurmSettings.from_file(args.config) if args.config else SlurmSettings()
        settings = settings.merged(jobs=args.jobs, queue=args.queue, walltime=args.walltime, gres=args.gres,
                                   cores=args.cores, memory=args.memory)
        options = EmbedOptions(grid=GridSpec(mpp=args.mpp), dtype=args.dtype, device=args.device)
        models = [m.strip() for m in args.model.split(",") if m.strip()]
        summary = run_cohort_dask(
            jobs, args.out, models, args.weights, options, cluster="slurm", slurm=settings,
            on_result=lambda r: print(f"{r.status:<8}{r.slide_id}" + (f": {r.error}" if r.error else ""),
                                      flush=True))
    except WsiEmbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"summary: {summary.line()}; manifest {summary.manifest}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
