"""Cohorts: find slides, give them stable ids, shard them, embed them (serially or with dask) and
keep a manifest. Every driver calls :func:`wsi_embed.pipeline.embed_slides` / ``embed_slide``."""

from .discover import SLIDE_EXTENSIONS, assign_ids, build_jobs, find_slides, read_list
from .manifest import Manifest, latest, read_manifest
from .run import CohortSummary, default_manifest, embed_cohort, plan_cohort, run_cohort
from .shard import Shard, parse_shard, slurm_shard

__all__ = [
    "SLIDE_EXTENSIONS", "CohortSummary", "Manifest", "Shard", "assign_ids", "build_jobs", "default_manifest",
    "embed_cohort", "find_slides", "latest", "parse_shard", "plan_cohort", "read_list", "read_manifest",
    "run_cohort", "slurm_shard",
]
