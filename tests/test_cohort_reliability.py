"""Issue 8 (reliability) for cohorts: ids that survive a growing cohort, ids that cannot name our
temporaries or overflow a file name, a manifest that cannot hit a slide or crash on a full disk,
locked slides in the exit status, and dask clusters that cannot start or never answer."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_embed import EmbedOptions, SlideResult, open_store
from wsi_embed.cohort import Manifest, assign_ids, plan_cohort, read_manifest, run_cohort
from wsi_embed.cohort.discover import collect
from wsi_embed.cohort.run import EXIT_FAILED, EXIT_LOCKED, CohortSummary, Recorder
from wsi_embed.cohort.shard import Shard
from wsi_embed.errors import InvalidOption
from wsi_embed.ids import MAX_ID_BYTES, NAME_MAX, id_problem
from wsi_embed.jobs import SlideJob
from wsi_embed.slide import fingerprint

MODEL = "timm:test_vit"
OPTS = EmbedOptions(workers=0, device="cpu")


# -- ids that stay put as the cohort grows --------------------------------------------------------
def fake_store(out: Path, sid: str, slide: Path | str, fp: str | None) -> Path:
    """Just the root zarr.json with `slide` attrs: all that the id rule reads."""
    store = out / f"{sid}.zarr"
    store.mkdir(parents=True)
    attrs = {"slide": {"path": str(slide), **({"fingerprint": fp} if fp else {})}}
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}))
    return store


@pytest.fixture()
def two_sites(tmp_path) -> Path:
    root = tmp_path / "cohort"
    for site, content in (("siteA", b"A" * 5000), ("siteB", b"B" * 5000), ("siteC", b"C" * 5000)):
        (root / site).mkdir(parents=True)
        (root / site / "001.svs").write_bytes(content)
    (root / "siteA" / "002.svs").write_bytes(b"two")
    return root


def ids_of(jobs) -> dict[str, str]:
    return {f"{j.path.parent.name}/{j.path.name}": j.slide_id for j in jobs}


def test_a_slide_keeps_the_id_of_its_store(two_sites, tmp_path):
    a, b = two_sites / "siteA" / "001.svs", two_sites / "siteB" / "001.svs"
    out = tmp_path / "out"
    hashed = ids_of(plan_cohort([a, b]))  # without --out: both hashed, as before
    assert hashed["siteA/001.svs"].startswith("001-") and hashed["siteB/001.svs"].startswith("001-")
    fake_store(out, "001", os.path.realpath(a), fingerprint(a))  # siteA/001 was embedded alone before
    grown = ids_of(plan_cohort([two_sites / "siteA", two_sites / "siteB"], out_dir=out))
    assert grown["siteA/001.svs"] == "001" and grown["siteA/002.svs"] == "002"
    assert grown["siteB/001.svs"] == hashed["siteB/001.svs"]  # the others: the same hashed ids as always
    # Input order and a third same-named slide do not move it; each shard sees the same answer.
    three = ids_of(plan_cohort([two_sites / "siteC", two_sites / "siteB", two_sites / "siteA"], out_dir=out))
    assert three["siteA/001.svs"] == "001" and len(set(three.values())) == 4
    shards = [j for i in range(3) for j in plan_cohort([two_sites], out_dir=out, shard=Shard(i, 3))]
    assert ids_of(shards) == ids_of(plan_cohort([two_sites], out_dir=out)) and len(shards) == 4


def test_moved_cohort_is_recognised_by_fingerprint(two_sites, tmp_path):
    out = tmp_path / "out"
    b = two_sites / "siteB" / "001.svs"
    fake_store(out, "001", "/old/mount/siteB/001.svs", fingerprint(b))  # path no longer matches
    ids = ids_of(plan_cohort([two_sites], out_dir=out))
    assert ids["siteB/001.svs"] == "001" and ids["siteA/001.svs"].startswith("001-")


def test_store_of_a_file_not_in_the_run_keeps_nobody(two_sites, tmp_path):
    out = tmp_path / "out"
    fake_store(out, "001", "/elsewhere/001.svs", "0" * 64)
    assert ids_of(plan_cohort([two_sites], out_dir=out)) == ids_of(plan_cohort([two_sites]))
    broken = tmp_path / "out2" / "001.zarr"
    broken.mkdir(parents=True)
    (broken / "zarr.json").write_text("{not json")  # unreadable: ignored, never a crash
    assert ids_of(plan_cohort([two_sites], out_dir=broken.parent)) == ids_of(plan_cohort([two_sites]))


def test_identical_copies_pick_one_keeper_deterministically(tmp_path):
    for site in ("x", "y"):
        (tmp_path / site).mkdir()
        (tmp_path / site / "s.svs").write_bytes(b"same bytes")
    out = tmp_path / "out"
    fake_store(out, "s", "/gone/s.svs", fingerprint(tmp_path / "x" / "s.svs"))
    first = ids_of(plan_cohort([tmp_path / "x", tmp_path / "y"], out_dir=out))
    again = ids_of(plan_cohort([tmp_path / "y", tmp_path / "x"], out_dir=out))
    assert first == again and first["x/s.svs"] == "s" and first["y/s.svs"].startswith("s-")


def test_growing_cohort_end_to_end(tmp_path, sample_slide):
    """siteA alone, then siteA + siteB: siteA/biopsy_000 keeps its store, nothing is orphaned."""
    from sample_data.synthetic import make_biopsies

    a = make_biopsies(tmp_path / "cohort" / "siteA", 1, size=(1200, 900))[0]
    b = make_biopsies(tmp_path / "cohort" / "siteB", 1, size=(1200, 900), seed=5)[0]
    assert a.name == b.name
    out = tmp_path / "out"
    first = run_cohort(plan_cohort([a.parent], out_dir=out), out, [MODEL], "random", OPTS)
    assert first.done == 1 and first.results[0].slide_id == "biopsy_000"
    jobs = plan_cohort([a.parent, b.parent], out_dir=out)
    summary = run_cohort(jobs, out, [MODEL], "random", OPTS)
    status = {r.slide_id: r.status for r in summary.results}
    hashed = [sid for sid in status if sid != "biopsy_000"]
    assert status["biopsy_000"] == "skipped" and len(hashed) == 1 and status[hashed[0]] == "done"
    assert sorted(p.name for p in out.glob("*.zarr")) == sorted(["biopsy_000.zarr", f"{hashed[0]}.zarr"])
    assert open_store(out / "biopsy_000.zarr").encoders == [MODEL]

    # A full manifest (here /dev/full) loses rows, not the run: one error line, ok is false.
    if os.path.exists("/dev/full"):
        again = run_cohort(jobs, out, [MODEL], "random", OPTS, manifest="/dev/full")
        assert again.skipped == 2 and again.failed == 0 and again.manifest_errors == 2
        assert not again.ok and again.exit_code == EXIT_FAILED
        assert "manifest incomplete: 2 row(s) not written" in again.line() and "ENOSPC" in again.line()


# -- ids that cannot collide with temporaries or overflow a file name ---------------------------------
def test_natural_ids_never_contain_the_temporary_mark(tmp_path):
    (tmp_path / "scan.tmp-1.svs").write_bytes(b"")
    (tmp_path / "other.TMP-2.svs").write_bytes(b"")
    ids = sorted(j.slide_id for j in plan_cohort([tmp_path]))
    assert ids == ["other_TMP-2", "scan_tmp-1"]


def test_explicit_id_with_the_temporary_mark_is_refused(tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text("path,slide_id\na.svs,case.tmp-1\n")
    with pytest.raises(InvalidOption, match=r"contains '\.tmp-'.*slide_id column"):
        assign_ids(collect(list_file=lst))


def test_id_problem_names_the_slide_and_the_limit(tmp_path):
    assert MAX_ID_BYTES == 161
    assert id_problem("x" * MAX_ID_BYTES) is None
    message = id_problem("x" * 250, tmp_path / "a.svs")
    assert message == (f"{tmp_path / 'a.svs'}: slide id is 250 bytes, too long for a file name (max 161); "
                       "give it a shorter id with --list and a slide_id column")
    assert id_problem("é" * 81) is not None  # 162 bytes: counted in bytes, not characters
    # The longest name made from the longest id fits, whichever host (<= 64 bytes) and pid.
    longest = f".{'x' * MAX_ID_BYTES}.zarr.old.tmp-{'h' * 64}-{4194304}-abcdef"
    assert len(longest) == NAME_MAX
    (tmp_path / longest).mkdir()


def test_long_ids_are_assigned_not_refused(tmp_path):
    """A long id must fail its own slide later (id_problem), not the whole cohort here."""
    long = tmp_path / ("y" * 200 + ".svs")
    long.write_bytes(b"")
    (tmp_path / "short.svs").write_bytes(b"")
    jobs = {j.slide_id: j for j in plan_cohort([tmp_path])}
    assert set(jobs) == {"y" * 200, "short"}
    assert id_problem("y" * 200, long) and id_problem("short") is None


# -- the manifest ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["slide.svs", "x.NDPI", "scan.tiff"])
def test_manifest_with_a_slide_extension_is_refused(tmp_path, name, sample_slide):
    target = tmp_path / name
    shutil.copy(sample_slide, target)
    before = target.read_bytes()
    with pytest.raises(InvalidOption, match=r"slide file extension.*\.csv or \.jsonl"):
        Manifest(target).check_writable()
    with pytest.raises(InvalidOption):
        Manifest(tmp_path / f"new-{name}").check_writable()  # even before it exists
    assert target.read_bytes() == before


def test_manifest_that_is_not_a_manifest_is_refused(tmp_path):
    notes = tmp_path / "notes.csv"
    notes.write_text("my precious notes\n")
    lst = tmp_path / "slides.csv"
    lst.write_text("path,mpp\na.svs,0.5\n")
    rows_csv = tmp_path / "rows.jsonl"
    rows_csv.write_text("timestamp,host,pid,path,slide_id,status\n")  # a CSV manifest named .jsonl
    for path in (notes, lst, rows_csv):
        before = path.read_bytes()
        with pytest.raises(InvalidOption, match="is not a wsi-embed manifest") as info:
            Manifest(path).check_writable()
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        assert path.read_bytes() == before
    binary = tmp_path / "blob.csv"
    binary.write_bytes(os.urandom(2000))
    with pytest.raises(InvalidOption):
        Manifest(binary).check_writable()


def test_real_manifests_and_empty_files_are_accepted(tmp_path):
    for name in ("m.csv", "m.jsonl"):
        book = Manifest(tmp_path / name)
        book.check_writable()  # new
        book.append(SlideResult("/x/a.svs", "a", "done"))
        book.check_writable()  # ours: appended to
    (tmp_path / "empty.csv").write_text("")
    Manifest(tmp_path / "empty.csv").check_writable()
    Manifest(os.devnull).check_writable()


def test_manifest_on_a_slide_stops_both_drivers_before_any_work(tmp_path, sample_slide):
    from wsi_embed.cohort.dask_driver import run_cohort_dask

    slide = tmp_path / "slide.svs"
    shutil.copy(sample_slide, slide)
    before = slide.read_bytes()
    jobs = plan_cohort([slide])
    with pytest.raises(InvalidOption, match="slide file extension"):
        run_cohort(jobs, tmp_path / "out", [MODEL], "random", OPTS, manifest=slide)
    with pytest.raises(InvalidOption, match="slide file extension"):
        run_cohort_dask(jobs, tmp_path / "out", [MODEL], "random", OPTS, cluster="local", manifest=slide)
    assert slide.read_bytes() == before and not list((tmp_path / "out").glob("*.zarr"))


def test_full_disk_loses_rows_not_the_run(tmp_path, monkeypatch, caplog):
    from wsi_embed.cohort import manifest as manifest_mod

    path = tmp_path / "manifest.csv"
    book = Manifest(path)
    book.append(SlideResult("/x/a.svs", "a", "done"))
    size = path.stat().st_size
    real_write = os.write

    def half_then_full(fd, data):  # a row cut in the middle by a full disk
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest_mod.os, "write", half_then_full)
    summary, seen = CohortSummary(total=3, manifest=path), []
    record = Recorder(book, summary, seen.append)
    with caplog.at_level(logging.DEBUG, logger="wsi_embed.cohort.results"):
        record(SlideResult("/x/b.svs", "b", "done", cells=5))
        record(SlideResult("/x/c.svs", "c", "skipped", note="complete"))
    monkeypatch.setattr(manifest_mod.os, "write", real_write)
    assert path.stat().st_size == size  # the half row was taken back
    assert [r.slide_id for r in seen] == ["b", "c"] and summary.done == 1 and summary.skipped == 1
    assert summary.manifest_errors == 2 and not summary.ok and summary.exit_code == EXIT_FAILED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0].getMessage() and "ENOSPC" in errors[0].getMessage()
    book.append(SlideResult("/x/d.svs", "d", "done"))  # space again: the file is still a clean CSV
    assert [r["slide_id"] for r in read_manifest(path)] == ["a", "d"]


def test_run_records_and_rows_after_a_cut_line_start_their_own(tmp_path, monkeypatch):
    from wsi_embed.report import append_run, read_runs

    out = tmp_path
    append_run(out, {"run": 1})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        append_run(out, {"run": 2, "cells": 5})
    monkeypatch.setattr(os, "write", real_write)
    assert (out / "runs.jsonl").read_text() == '{"run": 1}\n'  # the half record was taken back
    with open(out / "runs.jsonl", "a") as f:
        f.write('{"run": 3, "cel')  # cut by something else (a copy cut off, an older version)
    append_run(out, {"run": 4})
    assert read_runs(out) == [{"run": 1}, {"run": 4}]
    manifest = tmp_path / "manifest.csv"
    Manifest(manifest).append(SlideResult("/x/a.svs", "a", "done"))
    manifest.write_bytes(manifest.read_bytes() + b"2026-12-07T23:52:12+0000,vm,1,/x/b.s")
    Manifest(manifest).append(SlideResult("/x/c.svs", "c", "done"))
    rows = read_manifest(manifest)  # the cut row stays what it was; the next is whole
    assert [(r["slide_id"], r["status"]) for r in rows] == [("a", "done"), (None, None), ("c", "done")]


def test_dev_full_raises_enospc():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    book = Manifest("/dev/full")
    book.check_writable()  # a device: nothing to inspect
    with pytest.raises(OSError) as info:
        book.append(SlideResult("/x/a.svs", "a", "done"))
    assert info.value.errno == errno.ENOSPC


# -- the summary and the exit status -------------------------------------------------------------
def test_exit_codes():
    def summary(*results):
        s = CohortSummary(total=len(results))
        for r in results:
            s.add(r)
        return s

    done = SlideResult("a", "a", "done")
    locked = SlideResult("b", "b", "skipped", note="locked by host:12")
    complete = SlideResult("c", "c", "skipped", note="complete")
    failed = SlideResult("d", "d", "failed", error="bad")
    assert summary(done, complete).exit_code == 0 and EXIT_LOCKED == 4
    s = summary(done, locked, complete)
    assert (s.locked, s.skipped, s.ok, s.exit_code) == (1, 2, True, 4)
    assert "3 slides: 1 done, 2 skipped (1 locked by other runs), 0 failed" in s.line()
    assert summary(done, locked, failed).exit_code == 1
    assert "0 skipped, 0 failed" in summary(done).line()  # unchanged when nothing was locked


# -- dask clusters that cannot start or never answer ---------------------------------------------
def test_cluster_slurm_without_sbatch_is_one_line_at_once(tmp_path, monkeypatch):
    from wsi_embed.cohort.dask_driver import run_cohort_dask

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    jobs = plan_cohort([_touch(tmp_path / "a.svs")])
    started = time.monotonic()
    with pytest.raises(InvalidOption, match="--cluster slurm needs SLURM's sbatch on PATH"):
        run_cohort_dask(jobs, tmp_path / "out", [MODEL], "random", OPTS, cluster="slurm")
    assert time.monotonic() - started < 5


def test_cluster_slurm_without_sbatch_on_the_cli(tmp_path):
    """It used to print ~40 traceback lines (FileNotFoundError: 'sbatch') and then hang."""
    slide = _touch(tmp_path / "a.svs")
    env = {"PATH": str(tmp_path / "bin")}  # the CLI runs with sys.executable: no PATH needed
    proc = run_cli("embed", str(slide), "--out", str(tmp_path / "out"), "--model", MODEL, "--weights", "random",
                   "--cluster", "slurm", env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "sbatch" in ln]
    assert len(lines) == 1 and "--cluster slurm needs SLURM's sbatch on PATH" in lines[0]


def test_cluster_slurm_without_a_controller_is_one_line_at_once(tmp_path):
    """sbatch on PATH but no controller answering: dask-jobqueue's sbatch calls failed in tracebacks
    until the worker timeout (10 minutes) ran out. sinfo says what the real one says without a
    controller (the real one, given a configuration that does not exist, retries for 60 s first)."""
    slide = _touch(tmp_path / "a.svs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho 'sinfo: error: Unable to contact slurm controller (connect "
                                   "failure)' >&2\nexit 1\n")
    for name in ("sbatch", "sinfo"):
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_CONF": str(tmp_path / "no-slurm.conf")}
    started = time.monotonic()
    proc = run_cli("embed", str(slide), "--out", str(tmp_path / "out"), "--model", MODEL, "--weights", "random",
                   "--cluster", "slurm", env=env, timeout=120)
    assert time.monotonic() - started < 60
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith("error: --cluster slurm: SLURM's controller does not answer here (sinfo")
    assert not (tmp_path / "out").exists()


def test_unknown_cluster_is_refused_before_anything(tmp_path):
    from wsi_embed.cohort.dask_driver import run_cohort_dask

    with pytest.raises(InvalidOption, match="use local, slurm or a scheduler address"):
        run_cohort_dask([], tmp_path / "out", [MODEL], "random", OPTS, cluster="slrum")
    assert not (tmp_path / "out").exists()


def test_scheduler_that_never_answers_fails_in_bounded_time(tmp_path):
    from wsi_embed.cohort.dask_driver import ClusterUnavailable, run_cohort_dask

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = plan_cohort([_touch(tmp_path / "a.svs")])
    started = time.monotonic()
    with pytest.raises(ClusterUnavailable, match=f"tcp://127.0.0.1:{port}: no dask scheduler answered within 1 s"):
        run_cohort_dask(jobs, tmp_path / "out", [MODEL], "random", OPTS, cluster=f"tcp://127.0.0.1:{port}",
                        connect_timeout=1)
    assert time.monotonic() - started < 30


def never_runs(job, out_dir, models, weights, options, torch_threads=None):
    raise AssertionError("no worker should ever run this")


def test_cluster_without_workers_stops_in_bounded_time(tmp_path):
    """Like SLURM jobs that stay pending: no worker ever arrives."""
    from distributed import LocalCluster

    from wsi_embed.cohort.dask_driver import ClusterUnavailable, run_cohort_dask

    jobs = plan_cohort([_touch(tmp_path / "a.svs")])
    with LocalCluster(n_workers=0, dashboard_address=":0") as cluster:
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable, match="had no dask worker for 1 s"):
            run_cohort_dask(jobs, tmp_path / "out", [MODEL], "random", OPTS, cluster=cluster.scheduler_address,
                            task=never_runs, worker_timeout=1)
        assert time.monotonic() - started < 30


def test_timeouts_from_the_environment_are_checked(tmp_path, monkeypatch):
    from wsi_embed.cohort.dask_driver import run_cohort_dask

    monkeypatch.setenv("WSI_EMBED_WORKER_TIMEOUT", "soon")
    with pytest.raises(InvalidOption, match="WSI_EMBED_WORKER_TIMEOUT='soon'"):
        run_cohort_dask([], tmp_path / "out", [MODEL], "random", OPTS, cluster="local")
    with pytest.raises(InvalidOption, match="connect_timeout must be a positive"):
        run_cohort_dask([], tmp_path / "out", [MODEL], "random", OPTS, cluster="local", connect_timeout=0)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_dask_fails_a_too_long_id_alone_without_starting_a_cluster(tmp_path):
    from wsi_embed.cohort.dask_driver import run_cohort_dask

    long_id = "z" * 250
    jobs = [SlideJob(tmp_path / "a.svs", long_id)]
    summary = run_cohort_dask(jobs, tmp_path / "out", [MODEL], "random", OPTS, cluster="local", task=never_runs)
    (result,) = summary.results
    assert result.status == "failed" and result.error == id_problem(long_id, tmp_path / "a.svs")
    assert summary.exit_code == EXIT_FAILED and read_manifest(tmp_path / "out" / "manifest.csv")[0]["slide_id"] == long_id


def test_serial_run_fails_a_too_long_id_alone(tmp_path):
    long_path = _touch(tmp_path / "a.svs")
    locked = _touch(tmp_path / "b.svs")
    out = tmp_path / "out"
    out.mkdir()
    jobs = [SlideJob(long_path, "q" * 300), SlideJob(locked, "b")]
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the other slide: locked by a live process, so nothing is embedded and no model loads
        (out / ".b.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": owner.pid, "started": time.time(), "token": "x"}))
        summary = run_cohort(jobs, out, [MODEL], "random", OPTS)
    finally:
        owner.kill()
        owner.wait()
    status = {r.slide_id: r for r in summary.results}
    assert status["q" * 300].status == "failed" and "300 bytes, too long for a file name" in status["q" * 300].error
    assert status["b"].status == "skipped" and summary.exit_code == EXIT_FAILED


# -- module layout: no torch at import, no cycle, one place for what the drivers share -------------------
def test_importing_the_cohort_does_not_import_torch():
    """A client that only plans, shards or submits to a cluster never pays for torch (nor dask)."""
    code = ("import sys\n"
            "import wsi_embed.cohort, wsi_embed.cohort.run, wsi_embed.cohort.dask_driver, wsi_embed.cohort.cluster\n"
            "import wsi_embed.cohort.results\n"
            "heavy = [m for m in ('torch', 'torchvision', 'timm', 'dask', 'distributed', 'wsi_embed.pipeline')\n"
            "         if m in sys.modules]\n"
            "print(','.join(heavy) or 'none')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "none", proc.stdout


def test_drivers_share_one_results_module_and_cluster_names_stay_importable():
    import ast

    from wsi_embed.cohort import cluster, dask_driver, results, run

    assert run.CohortSummary is results.CohortSummary is dask_driver.CohortSummary
    assert run.Recorder is results.Recorder and run.EXIT_LOCKED == results.EXIT_LOCKED == 4
    for name in ("SlurmSettings", "open_client", "check_cluster", "ClusterUnavailable", "_visible_gpus", "_cores",
                 "WORKER_CONFIG", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_WORKER_TIMEOUT"):
        assert getattr(dask_driver, name) is getattr(cluster, name), name
    # no cycle: dask_driver does not import run (run imports dask_driver only inside embed_cohort)
    source = Path(dask_driver.__file__).read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "run" not in imported and "results" in imported and "cluster" in imported


def test_settled_is_the_skip_check_of_both_drivers(tmp_path):
    from wsi_embed.cohort.results import settled

    long_id = SlideJob(tmp_path / "a.svs", "x" * 300)
    assert settled(long_id, tmp_path, ["timm:test_vit"], "random", OPTS).status == "failed"
    fresh = SlideJob(tmp_path / "b.svs", "b")
    assert settled(fresh, tmp_path, ["timm:test_vit"], "random", OPTS) is None  # no store: work to do
