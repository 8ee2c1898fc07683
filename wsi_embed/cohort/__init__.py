"""Cohorts: find slides, give them stable ids, shard them, embed them (serially or with dask) and
keep a manifest. Every driver calls :func:`wsi_embed.pipeline.embed_slides` / ``embed_slide``.

- :mod:`.discover`, :mod:`.shard`: which slides, under which ids, in which part of an array job.
- :mod:`.results`: what every driver shares: the summary, the skip check, recording results.
- :mod:`.run`: the serial driver; :mod:`.dask_driver`: one dask task per slide, on the clusters
  that :mod:`.cluster` starts (local, SLURM, a scheduler address).
- :mod:`.manifest`, :mod:`.progress`: the run's log and its bars.

Importing this package imports neither torch nor dask: the drivers import the pipeline when they
run slides.
"""

from .discover import SLIDE_EXTENSIONS, assign_ids, build_jobs, find_slides, read_list
from .manifest import Manifest, latest, read_manifest
from .results import CohortSummary, default_manifest
from .run import embed_cohort, plan_cohort, run_cohort
from .shard import Shard, parse_shard, slurm_shard

__all__ = [
    "SLIDE_EXTENSIONS", "CohortSummary", "Manifest", "Shard", "assign_ids", "build_jobs", "default_manifest",
    "embed_cohort", "find_slides", "latest", "parse_shard", "plan_cohort", "read_list", "read_manifest",
    "run_cohort", "slurm_shard",
]
