"""Session fixtures: the real sample slide, synthetic pyramids made from its pixels, and stand-ins
for the published weight files (random weights of the exact published modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    if not SAMPLE.exists():
        from sample_data.fetch_sample import fetch_sample

        fetch_sample(SAMPLE.parent)
    return SAMPLE


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def painted_slide(slides_dir, sample_slide) -> tuple[Path, list[tuple[int, int, int, int]]]:
    """0.5 µm/px, tissue painted only inside two boxes (level-0 px)."""
    from sample_data.synthetic import make_slide

    boxes = [(448, 448, 1792, 1568), (2464, 1120, 3360, 2688)]
    return make_slide(slides_dir / "painted.tif", width=4096, height=3072, mpp=0.5, tissue_boxes=boxes), boxes


@pytest.fixture(scope="session")
def pyramid_025(slides_dir, sample_slide) -> Path:
    """A 40x-like 0.25 µm/px pyramid (downsamples 1, 4): at 0.5 µm/px each patch is a 448 px read."""
    from sample_data.synthetic import make_slide

    return make_slide(slides_dir / "pyr025.tif", width=4096, height=3584, mpp=0.25)


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds files with the published names (random weights)."""
    from tests.weights_helpers import write_published_standins

    home = tmp_path_factory.mktemp("torch_home")
    write_published_standins(home / "hub" / "checkpoints")
    return home


@pytest.fixture()
def offline_torch_home(torch_home, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``wsi-embed`` as a user would, in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "wsi_embed.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def planted_cohort(tmp_path_factory, sample_slide) -> dict:
    """Eight small slides of real tissue, the odd ones with a planted yellow-brown region (label 1), embedded
    once with the tiny random-weights ViT. Keys: ``slides`` (make_planted_cohort's rows), ``labels``
    (a CSV with slide_id, label, patient_id), ``out`` (the output folder of stores), ``encoder``."""
    import csv

    from sample_data.synthetic import make_planted_cohort

    root = tmp_path_factory.mktemp("planted")
    rows = make_planted_cohort(root / "slides", 8)
    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "patient_id"])
        for row in rows:
            writer.writerow([row["slide_id"], row["label"], row["patient_id"]])
    out = root / "out"
    # what `wsi-embed embed SLIDES --out OUT --model timm:test_vit --weights random --workers 0
    # --batch-size 32` runs, in-process (no interpreter and torch start-up): the cohort run, then the
    # run record, the maps and report.html (test_report reads them).
    # default pen_marks remove: the planted stain is not marker ink and must stay tissue
    from wsi_embed import EmbedOptions
    from wsi_embed.cohort import plan_cohort, run_cohort
    from wsi_embed.report import finish_run

    summary = run_cohort(plan_cohort([root / "slides"]), out, ["timm:test_vit"], "random",
                         EmbedOptions(workers=0, batch_size=32, prepare_processes=0))
    assert summary.ok and summary.done == len(rows), [r.error for r in summary.results]
    extras = finish_run(out, summary)
    assert not extras.warnings, extras.warnings
    return {"slides": rows, "labels": labels, "out": out, "encoder": "timm:test_vit"}
