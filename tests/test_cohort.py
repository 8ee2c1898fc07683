"""Cohorts: discovery, stable ids, list files, shards, the manifest, resume, kill -9, two processes
at once, and the dask driver (a LocalCluster, and a slide that kills its worker)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli
from wsi_embed import EmbedOptions, SlideResult, embed_slide, open_store
from wsi_embed.cohort import (Manifest, assign_ids, build_jobs, find_slides, parse_shard, plan_cohort,
                              read_list, read_manifest, run_cohort)
from wsi_embed.cohort.discover import collect
from wsi_embed.cohort.shard import Shard, slurm_shard
from wsi_embed.errors import InvalidOption, SlideNotFound

MODEL = "timm:test_vit"
FAST = ("--model", MODEL, "--weights", "random", "--workers", "0", "--device", "cpu")
OPTS = EmbedOptions(workers=0, device="cpu")


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def biopsies(tmp_path_factory, sample_slide) -> list[Path]:
    from sample_data.synthetic import make_biopsies

    return make_biopsies(tmp_path_factory.mktemp("biopsies"), 6, size=(2000, 1500))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, biopsies) -> Path:
    """A/biopsy_000, A/biopsy_001, B/biopsy_000 (other pixels, same name), B/sub/biopsy_003, a
    corrupt bad.svs, and files that are not slides (notes, a macOS '._' fork, a .zarr folder)."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "A").mkdir()
    (root / "B" / "sub").mkdir(parents=True)
    shutil.copy(biopsies[0], root / "A" / "biopsy_000.tif")
    shutil.copy(biopsies[1], root / "A" / "biopsy_001.tif")
    shutil.copy(biopsies[2], root / "B" / "biopsy_000.tif")
    shutil.copy(biopsies[3], root / "B" / "sub" / "biopsy_003.tif")
    (root / "bad.svs").write_bytes(b"II*\x00" + bytes(100))
    (root / "notes.txt").write_text("not a slide\n")
    (root / "A" / "._biopsy_000.tif").write_bytes(b"\x00\x05\x16\x07")
    (root / "old.zarr").mkdir()
    (root / "old.zarr" / "x.tif").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def serial(cohort, tmp_path_factory):
    """One CLI run over the cohort directory (the reference for the other tests)."""
    out = tmp_path_factory.mktemp("serial") / "out"
    proc = run_cli("embed", str(cohort), "--out", str(out), *FAST)
    return proc, out


def manifest_rows(out: Path) -> list[dict]:
    return read_manifest(out / "manifest.csv")


def embeddings(store: Path) -> np.ndarray:
    return open_store(store).embeddings(MODEL)[...]


def same_stores(a: Path, b: Path, ids) -> None:
    for sid in ids:
        x, y = open_store(a / f"{sid}.zarr"), open_store(b / f"{sid}.zarr")
        assert np.array_equal(x.mask, y.mask)
        assert np.array_equal(embeddings(a / f"{sid}.zarr"), embeddings(b / f"{sid}.zarr"), equal_nan=True), sid


def file_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name != "manifest.csv"}


# -- discovery and ids -------------------------------------------------------------------------
def test_discovery_finds_slides_and_ignores_the_rest(cohort):
    found = sorted(str(p.relative_to(cohort)) for p in find_slides(cohort))
    assert found == ["A/biopsy_000.tif", "A/biopsy_001.tif", "B/biopsy_000.tif", "B/sub/biopsy_003.tif",
                     "bad.svs"]


def test_dicom_series_is_one_slide_and_extensions_any_case(tmp_path):
    series = tmp_path / "case7"
    series.mkdir()
    for level in range(3):
        (series / f"level{level}.dcm").write_bytes(b"")
    (tmp_path / "UPPER.SVS").write_bytes(b"")
    (tmp_path / "scan.ndpi").write_bytes(b"")
    jobs = build_jobs([tmp_path])
    assert sorted(j.slide_id for j in jobs) == ["UPPER", "case7", "scan"]


def test_ids_unique_and_stable(cohort, tmp_path):
    ids = {str(j.path.relative_to(cohort)): j.slide_id for j in build_jobs([cohort])}
    assert ids["A/biopsy_001.tif"] == "biopsy_001" and ids["B/sub/biopsy_003.tif"] == "biopsy_003"
    a, b = ids["A/biopsy_000.tif"], ids["B/biopsy_000.tif"]
    assert a != b and a.startswith("biopsy_000-") and b.startswith("biopsy_000-")
    # Not the order, not the other slides of the run, not where the cohort is mounted.
    reordered = build_jobs([cohort / "B", cohort / "A" / "biopsy_000.tif"])
    assert {j.slide_id for j in reordered if j.path.name == "biopsy_000.tif"} == {a, b}
    moved = tmp_path / "elsewhere" / "cohort"
    shutil.copytree(cohort, moved)
    assert {str(j.path.relative_to(moved)): j.slide_id for j in build_jobs([moved])} == ids
    # The same file through two inputs is one slide.
    assert len(build_jobs([cohort, cohort / "A" / "biopsy_001.tif"])) == len(ids)


def test_case_insensitive_clash_gets_distinct_ids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "Slide.svs").write_bytes(b"")
    (tmp_path / "b" / "slide.svs").write_bytes(b"")
    ids = [j.slide_id for j in build_jobs([tmp_path])]
    assert len({i.lower() for i in ids}) == 2


def test_list_files_csv_and_txt(cohort, tmp_path):
    csv_list = tmp_path / "lists" / "slides.csv"
    csv_list.parent.mkdir()
    csv_list.write_text(f"path,mpp\n../{cohort.name}/A/biopsy_001.tif,0.25\n{cohort}/B/sub/biopsy_003.tif,\n")
    shutil.copytree(cohort, tmp_path / cohort.name)  # relative paths are relative to the list's folder
    entries = read_list(csv_list)
    assert [e.mpp for e in entries] == [0.25, None]
    assert entries[0].path == tmp_path / cohort.name / "A" / "biopsy_001.tif"
    jobs = build_jobs(list_file=csv_list, slide_mpp=0.5)
    assert [(j.slide_id, j.slide_mpp) for j in jobs] == [("biopsy_001", 0.25), ("biopsy_003", 0.5)]
    txt = tmp_path / "slides.txt"
    txt.write_text(f"# my cohort\n{cohort}/A/biopsy_001.tif\n\n{cohort}/missing.svs\n")
    assert [j.slide_id for j in build_jobs(list_file=txt)] == ["biopsy_001", "missing"]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,mpp\nx.svs,fast\n")
    with pytest.raises(InvalidOption, match="mpp"):
        read_list(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideNotFound, match="no slides found"):
        build_jobs([tmp_path / "empty"])
    (tmp_path / "scan.svs").mkdir()  # e.g. a copy tool that made a folder of the slide's name
    with pytest.raises(SlideNotFound, match="scan.svs: a folder named like a slide file, holding none; give the slide "
                                            "file itself"):
        build_jobs([tmp_path / "scan.svs"])


@pytest.mark.parametrize("text, needle", [
    ("path,slide_id\na.svs,A,\nb.svs,B,x\n", "line 3: 3 fields, but the header has 2 columns"),  # a trailing comma is fine
    ("path,mpp\n# a comment\n\na.svs,0.5\n\nb.svs,abc\n", "line 6: mpp"),  # the file's own line numbers
    ("path,slide_id\n,X\nb.svs,B\n", "line 2: no path"),
    ("path;slide_id\na.svs;A\n", "separated by semicolons"),
    ("filepath,slide_id\na.svs,A\n", "needs a 'path' column"),
])
def test_a_slide_list_mistake_is_one_line_naming_its_line(tmp_path, text, needle):
    lst = tmp_path / "l.csv"
    lst.write_text(text)
    with pytest.raises(InvalidOption, match=needle):
        read_list(lst)


def test_a_trailing_comma_in_a_slide_list_is_harmless(tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text("path,slide_id,\na.svs,A,\n,,\n")  # and an empty row a spreadsheet left
    assert [(e.path.name, e.slide_id) for e in read_list(lst)] == [("a.svs", "A")]
    txt = tmp_path / "l.txt"
    txt.write_text("image,1.svs\nslides/b.svs\n")  # a TXT list whose first path holds a comma
    assert [e.path.name for e in read_list(txt)] == ["image,1.svs", "b.svs"]


def test_explicit_ids_from_the_list_must_be_unique(tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text("path,slide_id\na.svs,case1\nb.svs,case1\n")
    with pytest.raises(InvalidOption, match="case1"):
        assign_ids(collect(list_file=lst))


# -- shards ------------------------------------------------------------------------------------
def test_shards_partition_the_cohort(cohort):
    jobs = build_jobs([cohort])
    parts = [Shard(i, 3).select(jobs) for i in range(3)]
    ids = [j.slide_id for part in parts for j in part]
    assert sorted(ids) == sorted(j.slide_id for j in jobs) and len(ids) == len(set(ids))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # Input order does not matter.
    assert [j.slide_id for j in Shard(1, 3).select(list(reversed(jobs)))] == [j.slide_id for j in parts[1]]


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"}, (2, 3)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "4",
      "SLURM_ARRAY_TASK_MAX": "7"}, (1, 4)),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "7"}, (3, 4)),
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_MAX": "10",
      "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "5"}, (2, 5)),
])
def test_slurm_shard_from_environment(env, expected):
    shard = parse_shard("slurm", env)
    assert (shard.index, shard.count) == expected


def test_shard_errors():
    with pytest.raises(InvalidOption, match="not a SLURM array"):
        slurm_shard({})
    with pytest.raises(InvalidOption, match="does not fit"):
        slurm_shard({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3"})
    for spec in ("3/3", "a/b", "2", "-1/4"):
        with pytest.raises(InvalidOption):
            parse_shard(spec)
    assert parse_shard(None) is None


def test_shard_slurm_on_the_cli_outside_an_array(tmp_path, cohort):
    env = {k: "" for k in os.environ if k.startswith("SLURM_ARRAY")}
    proc = run_cli("embed", str(cohort), "--out", str(tmp_path / "o"), "--shard", "slurm", *FAST, env=env)
    assert proc.returncode == 1 and "SLURM_ARRAY_TASK_ID is not set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_empty_shard_names_no_manifest(biopsies, tmp_path):
    (tmp_path / "one").mkdir()
    shutil.copy(biopsies[0], tmp_path / "one" / "a.tif")
    proc = run_cli("embed", str(tmp_path / "one"), "--out", str(tmp_path / "o"), "--shard", "1/2", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "0 slides" in proc.stdout and "no manifest (no slide ran)" in proc.stdout
    assert not (tmp_path / "o" / "manifest.csv").exists()


def test_three_shards_embed_each_slide_once(biopsies, tmp_path):
    out = tmp_path / "out"
    for i in range(3):
        jobs = plan_cohort([biopsies[0].parent], shard=Shard(i, 3))
        summary = run_cohort(jobs, out, [MODEL], "random", OPTS)
        assert summary.ok and summary.done == len(jobs)
    done = [r["slide_id"] for r in manifest_rows(out) if r["status"] == "done"]
    assert sorted(done) == sorted(p.stem for p in biopsies)


# -- the manifest ------------------------------------------------------------------------------
def _append_many(path, n, tag):
    book = Manifest(path)
    for i in range(n):
        book.append(SlideResult(f"/x/{tag}-{i}.svs", f"{tag}-{i}", "failed",
                                error="line one\nline two, with \"quotes\"" * 20))


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.jsonl"])
def test_manifest_concurrent_appends_stay_whole(tmp_path, name):
    path = tmp_path / name
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, 50, f"p{k}")) for k in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    rows = read_manifest(path)
    assert len(rows) == 300 and len({r["slide_id"] for r in rows}) == 300
    assert all(r["error"].startswith("line one\nline two") for r in rows)
    if name.endswith(".csv"):
        assert path.read_text().count("timestamp,host,pid") == 1


# -- the CLI on a cohort -----------------------------------------------------------------------
def test_cohort_with_a_bad_slide_and_same_names(serial, cohort):
    proc, out = serial
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "bad.svs" in errors[0]
    assert "summary: 5 slides: 4 done, 0 skipped, 1 failed" in proc.stdout
    rows = {r["slide_id"]: r for r in manifest_rows(out)}
    assert len(rows) == 5
    assert rows["bad"]["status"] == "failed" and rows["bad"]["error"]
    assert rows["bad"]["path"] == str(cohort / "bad.svs")
    same = [sid for sid in rows if sid.startswith("biopsy_000-")]
    assert len(same) == 2
    for sid in same + ["biopsy_001", "biopsy_003"]:
        row = rows[sid]
        assert row["status"] == "done" and int(row["cells"]) > 0 and row["encoders"] == MODEL
        assert row["host"] and int(row["pid"]) > 0 and float(row["seconds"]) > 0
        assert open_store(out / f"{sid}.zarr").encoders == [MODEL]
    # The two same-named slides hold different pixels, so different embeddings.
    a, b = (embeddings(out / f"{sid}.zarr") for sid in same)
    assert a.shape != b.shape or not np.array_equal(a, b, equal_nan=True)
    assert not list(out.glob(".*.lock")) and not list(out.glob(".*tmp-*"))


def test_resume_rewrites_nothing_and_loads_no_model(serial, cohort, tmp_path, monkeypatch):
    _, reference = serial
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = file_mtimes(out)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every store is complete")

    monkeypatch.setattr("wsi_embed.encoders.load_encoder", no_model)
    summary = run_cohort(plan_cohort([cohort]), out, [MODEL], "random", OPTS)
    assert (summary.done, summary.skipped, summary.failed) == (0, 4, 1)  # bad.svs fails again, fast
    assert file_mtimes(out) == before
    assert [r["status"] for r in manifest_rows(out)[-5:]].count("skipped") == 4


def test_incomplete_and_stale_leftovers_are_redone(serial, cohort, tmp_path):
    _, reference = serial
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    # biopsy_001: its encoder group is not complete (as if killed before the flag was written),
    # plus a temporary store and a lock left by a killed run.
    attrs_file = out / "biopsy_001.zarr" / "timm-test_vit" / "zarr.json"
    meta = json.loads(attrs_file.read_text())
    meta["attributes"]["complete"] = False
    attrs_file.write_text(json.dumps(meta))
    (out / ".biopsy_001.zarr.tmp-deadhost-1-abc").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".biopsy_001.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "started": time.time(), "token": "x"}))
    keep = file_mtimes(out / "biopsy_003.zarr")
    summary = run_cohort(plan_cohort([cohort / "A", cohort / "B"]), out, [MODEL], "random", OPTS)
    assert summary.ok and summary.done == 1 and summary.skipped == 3
    assert [r.slide_id for r in summary.results if r.status == "done"] == ["biopsy_001"]
    assert open_store(out / "biopsy_001.zarr").encoders == [MODEL]
    same_stores(out, reference, ["biopsy_001"])
    assert not list(out.glob(".*tmp-*")) and not list(out.glob(".*.lock"))
    assert file_mtimes(out / "biopsy_003.zarr") == keep


def test_overwrite_redoes_everything(biopsies, tmp_path):
    out = tmp_path / "out"
    jobs = plan_cohort(biopsies[:2])
    run_cohort(jobs, out, [MODEL], "random", OPTS)
    again = run_cohort(jobs, out, [MODEL], "random", EmbedOptions(workers=0, device="cpu", overwrite=True))
    assert again.done == 2


def test_locked_slide_is_skipped_not_failed(biopsies, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".biopsy_000.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": owner.pid, "started": time.time(), "token": "x"}))
        summary = run_cohort(plan_cohort(biopsies[:2]), out, [MODEL], "random", OPTS)
        first = summary.results[0]
        assert first.status == "skipped" and first.note == f"locked by {socket.gethostname()}:{owner.pid}"
        assert summary.ok and summary.done == 1 and not (out / "biopsy_000.zarr").exists()
        assert summary.locked == 1 and summary.exit_code == 4  # not "all done": rerun later
    finally:
        owner.kill()
        owner.wait()
    summary = run_cohort(plan_cohort(biopsies[:2]), out, [MODEL], "random", OPTS)  # owner gone: redone
    assert summary.done == 1 and summary.results[0].slide_id == "biopsy_000"


# -- interruptions and concurrency -------------------------------------------------------------
@pytest.fixture(scope="module")
def big_slide(tmp_path_factory, sample_slide) -> Path:
    from sample_data.synthetic import make_slide

    return make_slide(tmp_path_factory.mktemp("big") / "big.tif", width=6000, height=6000, mpp=0.5)


def test_kill_9_mid_slide_then_resume_equals_clean_run(big_slide, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "wsi_embed.cli", "embed", str(big_slide), "--out", str(out), *FAST,
            "--dtype", "float32", "--batch-size", "32"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # Kill once some embeddings are on disk: mid-slide, not before it starts.
            if list(out.glob(".big.zarr.tmp-*/timm-test_vit/embeddings/c/*")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed; use a bigger slide"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "big.zarr").exists()
    assert list(out.glob(".big.zarr.tmp-*")) and (out / ".big.lock").exists()  # what a killed run leaves

    opts = EmbedOptions(workers=0, device="cpu", dtype="float32", batch_size=32)
    summary = run_cohort(plan_cohort([big_slide]), out, [MODEL], "random", opts)
    assert summary.ok and summary.done == 1
    assert not list(out.glob(".*tmp-*")) and not (out / ".big.lock").exists()

    clean = tmp_path / "clean"
    embed_slide(big_slide, clean, [MODEL], "random", opts)
    same_stores(out, clean, ["big"])


def test_sigterm_releases_the_lock_and_cleans_up(big_slide, tmp_path):
    """SLURM's time limit and scancel send SIGTERM: the slide's lock must not outlive the run."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "wsi_embed.cli", "embed", str(big_slide), "--out", str(out), *FAST]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (time.monotonic() < deadline and proc.poll() is None
           and not list(out.glob(".big.zarr.tmp-*/timm-test_vit/embeddings/c/*"))):
        time.sleep(0.02)  # mid-slide: locked, some embeddings written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not (out / ".big.lock").exists() and not list(out.glob(".*tmp-*")) and not (out / "big.zarr").exists()


def test_two_processes_never_embed_a_slide_twice(biopsies, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_embed.cli", "embed", str(biopsies[0].parent), "--out", str(out), *FAST]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    # 4: nothing failed, but a slide was skipped because the other run held it (exit codes: run.py)
    assert all(p.returncode in (0, 4) for p in procs), outs
    rows = manifest_rows(out)
    done = [r["slide_id"] for r in rows if r["status"] == "done"]
    assert sorted(done) == sorted(p.stem for p in biopsies)  # each exactly once, across both
    assert len(rows) == 2 * len(biopsies)  # every other row: skipped (complete, or locked by the other)
    for p in biopsies:
        assert open_store(out / f"{p.stem}.zarr").encoders == [MODEL]
    assert not list(out.glob(".*.lock")) and not list(out.glob(".*tmp-*"))


# -- dask ----------------------------------------------------------------------------------------
def test_cluster_local_equals_serial(serial, cohort, tmp_path):
    _, reference = serial
    out = tmp_path / "out"
    proc = run_cli("embed", str(cohort), "--out", str(out), *FAST, "--cluster", "local", "--cluster-workers", "2")
    assert proc.returncode == 1, proc.stderr  # bad.svs
    assert "summary: 5 slides: 4 done, 0 skipped, 1 failed" in proc.stdout
    rows = {r["slide_id"]: r for r in manifest_rows(out)}
    assert rows["bad"]["status"] == "failed"
    good = [sid for sid, r in rows.items() if r["status"] == "done"]
    assert len(good) == 4
    assert len({rows[sid]["pid"] for sid in good} | {str(os.getpid())}) >= 2  # rows name the workers
    same_stores(out, reference, good)


def fake_task(job, out_dir, models, weights, options, torch_threads=None):
    """Stands in for embed_task: 'crash' kills its worker, 'flaky' fails on its first try only."""
    if job.slide_id == "crash":
        os._exit(1)
    if job.slide_id == "flaky":
        marker = Path(out_dir) / "flaky.tried"
        if not marker.exists():
            marker.write_text("")
            raise OSError("transient: NFS hiccup")
    return SlideResult(str(job.path), job.slide_id, "done", cells=1, encoders=list(models)), "worker", os.getpid()


@pytest.mark.slow  # in -m slow: keeps CI under 15 minutes
def test_dask_worker_death_is_a_failed_slide_and_errors_are_retried(tmp_path):
    from wsi_embed.cohort.dask_driver import run_cohort_dask
    from wsi_embed.jobs import SlideJob

    jobs = [SlideJob(tmp_path / f"{sid}.svs", sid) for sid in ("ok1", "crash", "flaky", "ok2")]
    summary = run_cohort_dask(jobs, tmp_path / "out", [MODEL], "random", OPTS, cluster="local", n_workers=2,
                              task=fake_task, retries=2, allowed_failures=1)
    status = {r.slide_id: r for r in summary.results}
    assert {k: v.status for k, v in status.items()} == {"ok1": "done", "crash": "failed", "flaky": "done",
                                                         "ok2": "done"}
    assert "worker died" in status["crash"].error
    rows = {r["slide_id"]: r for r in manifest_rows(tmp_path / "out")}
    assert rows["crash"]["status"] == "failed" and rows["ok1"]["host"] == "worker"


def env_task(job, out_dir, models, weights, options, torch_threads=None):
    """Reports what the worker process looks like instead of embedding."""
    import multiprocessing as mp

    import dask

    profile = dask.config.get("distributed.worker.profile.enabled")
    note = f"{os.environ.get('CUDA_VISIBLE_DEVICES')},{mp.current_process().daemon},{options.workers},{profile}"
    return SlideResult(str(job.path), job.slide_id, "done", note=note), "worker", os.getpid()


def test_local_gpu_workers_are_pinned_and_may_fork(tmp_path, monkeypatch):
    """Without a GPU here: pretend two are visible and look at the workers the driver starts."""
    from wsi_embed.cohort import cluster, dask_driver
    from wsi_embed.jobs import SlideJob

    monkeypatch.setattr(cluster, "_visible_gpus", lambda device: ["3", "5"])
    jobs = [SlideJob(tmp_path / f"s{i}.svs", f"s{i}") for i in range(6)]
    summary = dask_driver.run_cohort_dask(jobs, tmp_path / "out", [MODEL], "random", EmbedOptions(),
                                          cluster="local", task=env_task)
    notes = {r.note for r in summary.results}
    loader = max(0, cluster._cores() // 2 - 1)
    # Pinned, non-daemonic, no statistical profiler (it deadlocks Python 3.11 now and then).
    assert notes <= {f"3,False,{loader},False", f"5,False,{loader},False"} and len(summary.results) == 6


@pytest.mark.slow  # in -m slow: keeps CI under 15 minutes
def test_running_scheduler_address(biopsies, serial, tmp_path):
    """--cluster tcp://...: a scheduler we did not start; its workers are daemonic, so the task
    reads in-process even when loader workers were asked for."""
    from distributed import LocalCluster

    from wsi_embed.cohort.dask_driver import run_cohort_dask

    _, reference = serial
    jobs = plan_cohort([biopsies[1]])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        summary = run_cohort_dask(jobs, tmp_path, [MODEL], "random", EmbedOptions(workers=2, device="cpu"),
                                  cluster=cluster.scheduler_address)
    assert summary.ok and summary.done == 1
    same_stores(tmp_path, reference, ["biopsy_001"])


def test_plain_images_in_a_folder_are_named_and_an_empty_folder_is_said_once(sample_slide, tmp_path, caplog):
    from PIL import Image

    slides, pictures = tmp_path / "slides", tmp_path / "pictures"
    slides.mkdir()
    pictures.mkdir()
    shutil.copy(sample_slide, slides / "a.svs")
    Image.new("RGB", (32, 32)).save(slides / "photo.png")
    Image.new("RGB", (32, 32)).save(pictures / "scan.jpg")
    with caplog.at_level("WARNING", logger="wsi_embed.cohort.discover"):
        entries = collect([slides, pictures])
    assert [e.path.name for e in entries] == ["a.svs"]
    text = caplog.text
    assert "1 plain image file(s) left out (e.g. photo.png)" in text and "e.g. scan.jpg" in text
    assert f"{pictures}: no slide files found" in text
    caplog.clear()
    (tmp_path / "empty").mkdir()
    with caplog.at_level("WARNING", logger="wsi_embed.cohort.discover"):
        assert collect([tmp_path / "empty"]) == []
    assert "no slide files found" not in caplog.text  # build_jobs' error says it, once
    with pytest.raises(SlideNotFound, match="no slides found"):
        build_jobs([tmp_path / "empty"])
