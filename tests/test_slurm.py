"""On a real (single-node) SLURM: the job-array recipe and dask-jobqueue's SLURMCluster.

Skipped with a reason when SLURM is not running (start it with ``bash .ci/slurm.sh up`` as root);
with ``WSI_EMBED_REQUIRE_SLURM=1`` (CI) it is started if needed and the tests must run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import slurm_cluster
from tests.conftest import ROOT
from wsi_embed import EmbedOptions, open_store
from wsi_embed.cohort import plan_cohort, read_manifest, run_cohort

pytestmark = pytest.mark.slurm

MODEL = "timm:test_vit"
N_SLIDES = 6


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    required = os.environ.get("WSI_EMBED_REQUIRE_SLURM") == "1"
    if not slurm_cluster._is_up():
        if not required:
            pytest.skip("SLURM is not running here; start it with `bash .ci/slurm.sh up` (root), "
                        "or set WSI_EMBED_REQUIRE_SLURM=1 to start it from the tests")
        slurm_cluster.ensure_slurm()  # CI: must come up, or the tests fail
    return slurm_cluster.ensure_slurm()


@pytest.fixture(scope="module")
def slides(tmp_path_factory, sample_slide) -> Path:
    from sample_data.synthetic import make_biopsies

    directory = tmp_path_factory.mktemp("slurm_slides")
    make_biopsies(directory, N_SLIDES, size=(2000, 1500), seed=11)
    return directory


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory) -> Path:
    """The same cohort, serially in this process."""
    out = tmp_path_factory.mktemp("slurm_reference")
    summary = run_cohort(plan_cohort([slides]), out, [MODEL], "random",
                         EmbedOptions(workers=0, device="cpu", dtype="float32"))
    assert summary.ok and summary.done == N_SLIDES
    return out


def assert_same_as_reference(out: Path, reference: Path, slides: Path) -> list[dict]:
    rows = read_manifest(out / "manifest.csv")
    done = [r["slide_id"] for r in rows if r["status"] == "done"]
    ids = sorted(p.stem for p in slides.glob("*.tif"))
    assert sorted(done) == ids, rows  # every slide exactly once
    for sid in ids:
        ours, ref = open_store(out / f"{sid}.zarr"), open_store(reference / f"{sid}.zarr")
        assert ours.encoders == [MODEL]
        assert np.array_equal(ours.mask, ref.mask)
        assert np.array_equal(ours.embeddings(MODEL)[...], ref.embeddings(MODEL)[...], equal_nan=True), sid
    assert not list(out.glob(".*.lock")) and not list(out.glob(".*tmp-*"))
    return rows


def test_job_array_script(slurm_env, slides, reference, tmp_path):
    out = tmp_path / "out"
    env = {**slurm_env, "SLIDES": str(slides), "OUT": str(out), "MODEL": MODEL, "WEIGHTS": "random",
           "WORKERS": "0", "WSI_EMBED": f"{sys.executable} -m wsi_embed.cli",
           "EXTRA_ARGS": "--dtype float32 --device cpu"}
    job = slurm_cluster.sbatch(
        ROOT / "workflows" / "slurm_array.sbatch", "--array=0-2", "--cpus-per-task=1", "--mem=2G",
        "--time=00:10:00", f"--output={tmp_path}/task-%A_%a.out", f"--chdir={tmp_path}", env=env)
    states = slurm_cluster.wait_for_jobs([job], timeout=300, env=slurm_env)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("task-*.out")))
    assert len(states) == 3 and set(states.values()) == {"COMPLETED"}, (states, logs)
    rows = assert_same_as_reference(out, reference, slides)
    assert len({r["pid"] for r in rows}) == 3  # three tasks shared the work
    assert logs.count("summary: 2 slides: 2 done") == 3, logs


def test_dask_slurm_cluster(slurm_env, slides, reference, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "workflows" / "dask_slurm.py"), str(slides), "--out", str(out),
           "--model", MODEL, "--weights", "random", "--dtype", "float32", "--device", "cpu",
           "--jobs", "2", "--cores", "1", "--memory", "2GB", "--walltime", "00:10:00"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, **slurm_env})
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert f"summary: {N_SLIDES} slides: {N_SLIDES} done" in stdout
    rows = assert_same_as_reference(out, reference, slides)
    # Rows name the dask workers (processes of the SLURM jobs), not the driver.
    assert all(r["pid"] != str(proc.pid) for r in rows)
    assert list((out / "logs").glob("*.err"))  # the SLURM jobs' logs
