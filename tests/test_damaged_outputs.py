"""What a user meets with unreadable slides and stores damaged by hand: one line, the others go on,
and every command agrees with `wsi-embed verify` about which stores are damaged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from wsi_embed.verify import verify_store

VIT = "timm:test_vit"
EMBED = ("--model", VIT, "--weights", "random", "--workers", "0", "--no-maps")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, sample_slide) -> Path:
    """Three complete stores of the sample slide (a, b, c) and their QC pictures."""
    root = tmp_path_factory.mktemp("damaged")
    slides = root / "slides"
    slides.mkdir()
    for name in "abc":
        shutil.copy(sample_slide, slides / f"{name}.svs")
    proc = run_cli("embed", str(slides), "--out", str(root / "out"), *EMBED)
    assert proc.returncode == 0, proc.stderr
    return root


def _copy(cohort: Path, where: Path) -> Path:
    shutil.copytree(cohort / "out", where)
    return where


def _edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


@pytest.mark.skipif(not shutil.which("setpriv") and os.geteuid() == 0, reason="root reads any file without setpriv")
def test_a_slide_this_user_may_not_read_fails_alone_in_one_line(cohort, sample_slide, tmp_path):
    """A PermissionError from the slide readers printed a traceback; now one line, the others embed."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(sample_slide, slides / "good.svs")
    shutil.copy(sample_slide, slides / "locked.svs")
    os.chmod(slides / "locked.svs", 0)
    # as root, file modes do not bite unless the capabilities that override them are dropped
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "wsi_embed.cli", "embed", str(slides), "--out",
                           str(tmp_path / "out"), *EMBED], capture_output=True, text=True, cwd=ROOT, timeout=600)
    _no_traceback(proc)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: {slides / 'locked.svs'}: cannot be read (permission denied); ask for read access "
                      "to it or copy it somewhere you can read"]
    assert (tmp_path / "out" / "good.zarr").is_dir() and not (tmp_path / "out" / "locked.zarr").exists()


def test_export_and_index_skip_what_verify_calls_damaged(cohort, tmp_path):
    """A store without its slide attrs crashed `export --format trident` (KeyError); a store whose
    encoder dim was edited was exported, and stopped `index` for every store."""
    out = _copy(cohort, tmp_path / "out")
    _edit_json(out / "a.zarr" / "zarr.json", lambda d: d["attributes"].pop("slide"))
    _edit_json(out / "b.zarr" / "timm-test_vit" / "zarr.json", lambda d: d["attributes"]["encoder"].update(dim=7))
    for fmt in ("trident", "clam", "stamp"):
        proc = run_cli("export", str(out), "--format", fmt, "--encoder", VIT, "--to", str(tmp_path / fmt))
        _no_traceback(proc)
        assert proc.returncode == 1
        lines = proc.stdout.strip().splitlines()
        assert lines[0].startswith(f"error: {out / 'a.zarr'}: damaged: geometry (zarr.json: root attrs slide missing)")
        assert "cannot be repaired automatically" in lines[0] and "--overwrite" in lines[0]
        assert lines[1].startswith(f"error: {out / 'b.zarr'}: damaged: encoder {VIT}") and "7" in lines[1]
        assert lines[2].startswith("exported c ") and lines[3].startswith("summary: 3 slides: 1 exported")
    proc = run_cli("index", str(out), "--encoder", VIT)
    _no_traceback(proc)
    assert proc.returncode == 0
    manifest = json.loads((Path(proc.stdout.strip()) / "index.json").read_text())
    assert [s["store"] for s in manifest["skipped"]] == ["a.zarr", "b.zarr"]
    assert [s["slide_id"] for s in manifest["slides"]] == ["c"]


def test_export_into_a_store_is_refused(cohort, tmp_path):
    out = _copy(cohort, tmp_path / "out")
    proc = run_cli("export", str(out), "--format", "clam", "--encoder", VIT, "--to", str(out / "a.zarr" / "exp"))
    _no_traceback(proc)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {out / 'a.zarr' / 'exp'}: is inside the store {out / 'a.zarr'}; "
                                   "choose a --to outside the stores")
    assert not (out / "a.zarr" / "exp").exists() and verify_store(out / "a.zarr").ok


def test_a_store_without_its_encoder_group_is_damaged_beyond_repair(cohort, tmp_path):
    """verify and inspect said ok for a store whose only group was deleted."""
    out = _copy(cohort, tmp_path / "out")
    shutil.rmtree(out / "a.zarr" / "timm-test_vit")
    proc = run_cli("verify", str(out), "--repair")
    _no_traceback(proc)
    assert proc.returncode == 1
    line = proc.stdout.splitlines()[0]
    assert line.startswith(f"damaged  {out / 'a.zarr'}: geometry (encoder groups: none") and "not repaired" in line
    proc = run_cli("verify", str(out))
    assert proc.stdout.strip().splitlines()[-1] == ("summary: 3 stores: 2 ok, 1 damaged; --repair cannot fix these: "
                                                    "see each store's line")
    assert run_cli("inspect", str(out / "a.zarr")).returncode == 1


def test_a_rerun_fails_a_store_with_unreadable_geometry_and_survives_a_damaged_picture(cohort, tmp_path):
    """With its QC picture gone, a store whose mask metadata was cut (a) or whose thumbnail fails
    its checksum (b) crashed the whole rerun while the picture was drawn again; (a) with its picture
    was skipped as complete. (a) now fails with the repair that rebuilds it with all its groups."""
    out = _copy(cohort, tmp_path / "out")
    meta = out / "a.zarr" / "mask" / "zarr.json"
    meta.write_text(meta.read_text()[:100])
    thumb = next(p for p in (out / "b.zarr" / "thumbnail" / "c").rglob("*") if p.is_file())
    data = bytearray(thumb.read_bytes())
    data[len(data) // 2] ^= 0xFF
    thumb.write_bytes(bytes(data))
    for name in "ab":
        (out / f"{name}.qc.png").unlink()
    proc = run_cli("embed", str(cohort / "slides"), "--out", str(out), *EMBED)
    _no_traceback(proc)
    assert proc.returncode == 1, proc.stderr
    assert "skipped b:" in proc.stdout and "skipped c:" in proc.stdout
    assert (f"error: {out / 'a.zarr'}: damaged (mask metadata cannot be read); repair it with: wsi-embed verify "
            f"{out / 'a.zarr'} --repair") in proc.stderr
    repair = run_cli("verify", str(out / "a.zarr"), "--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert verify_store(out / "a.zarr").ok and (out / "a.qc.png").is_file()
    assert (f"b: could not draw the missing QC picture (a chunk fails its checksum); the store looks damaged: "
            f"check it with wsi-embed verify {out / 'b.zarr'}") in proc.stderr


def test_a_slide_changed_in_place_is_named_as_changed(cohort, sample_slide, tmp_path):
    slide = tmp_path / "x.svs"
    shutil.copy(sample_slide, slide)
    from wsi_embed import EmbedOptions, embed_slide  # the CLI prints "error: " and this line

    out, opts = tmp_path / "out", EmbedOptions(workers=0)
    assert embed_slide(slide, out, [VIT], "random", opts).status == "done"
    with open(slide, "r+b") as f:  # another scan under the same name: its first MiB differs
        f.seek(500_000)
        f.write(b"0123456789")
    again = embed_slide(slide, out, [VIT], "random", opts)
    assert again.status == "failed"
    assert again.error == (f"{slide}: has changed since the store {out / 'x.zarr'} was made from it; use --overwrite "
                           "to embed it again")


@pytest.mark.slow  # in -m slow: keeps CI under 15 minutes
def test_outputs_inside_the_input_folder_are_not_plain_pictures(cohort, tmp_path):
    """With --out inside the slide folder, the second run warned about its own QC pictures."""
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    for _ in range(2):
        proc = run_cli("embed", str(slides), "--out", str(slides / "out"), *EMBED)
        assert proc.returncode == 0, proc.stderr
    assert "plain image file" not in proc.stderr


def test_an_out_that_is_a_file_and_an_inspect_of_nothing_say_so(sample_slide, tmp_path):
    target = tmp_path / "outfile"
    target.write_text("x")
    proc = run_cli("embed", str(sample_slide), "--out", str(target), *EMBED)
    assert proc.returncode != 0 and proc.stderr.strip().endswith(
        f"error: {target}: is a file, not a folder; --out takes a folder (new or existing)"), proc.stderr
    assert target.read_text() == "x"
    proc = run_cli("inspect", str(tmp_path / "nope.zarr"))
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {tmp_path / 'nope.zarr'}: no such file or directory; give a <slide_id>.zarr folder")


# -- after kill -9: what the next run finds ---------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _dead_suffix() -> str:
    import socket

    return f".tmp-{socket.gethostname()}-{_dead_pid()}-abcdef"


@pytest.mark.parametrize("command", ["verify", "embed"])
def test_a_store_moved_aside_by_a_killed_repair_is_put_back(cohort, tmp_path, command):
    """`verify --repair` moves a damaged store aside while it rebuilds it; killed before its commit,
    the next embed deleted the backup and the store's other (intact) encoder groups with it."""
    out = _copy(cohort, tmp_path / "out")
    backup = out / f".a.zarr.bad{_dead_suffix()}"
    os.rename(out / "a.zarr", backup)
    args = ("verify", str(out)) if command == "verify" else ("embed", str(cohort / "slides"), "--out", str(out), *EMBED)
    proc = run_cli(*args)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert not backup.exists() and verify_store(out / "a.zarr").ok
    assert f"{out / 'a.zarr'}: put back as it was before a repair that was interrupted" in proc.stderr
    if command == "embed":
        assert "skipped a:" in proc.stdout


def test_a_picture_a_killed_run_left_half_done_is_drawn_again_and_temporaries_go(cohort, tmp_path):
    """Killed after its commit but while drawing the QC picture (a group added: the old picture's
    caption lacks it), a run left the old picture and its temporary; the next run skipped the
    store and kept both. The lock is now held until the picture is written."""
    out = _copy(cohort, tmp_path / "out")
    good = (out / "a.qc.png").read_bytes()
    (out / "a.qc.png").write_bytes(good[: len(good) // 2])  # a picture that is not this store's
    lock = out / ".a.lock"
    lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": _dead_pid(),
                                "started": 0, "token": "t0", "proc_start": None}))
    stale = [out / f".a.qc.png{_dead_suffix()}", out / f".b.timm-test_vit.map.png{_dead_suffix()}",
             out / f".report.html{_dead_suffix()}"]
    for path in stale:
        path.write_bytes(b"")
    proc = run_cli("embed", str(cohort / "slides"), "--out", str(out), *EMBED)
    assert proc.returncode == 0, proc.stderr
    assert "skipped a:" in proc.stdout and not lock.exists()
    assert (out / "a.qc.png").read_bytes() == good
    assert not [p for p in stale if p.exists()]


def test_a_changed_slide_mpp_is_another_grid(cohort, sample_slide, tmp_path):
    """--slide-mpp was not part of the resume check: a folder silently held slides at two scales."""
    out = _copy(cohort, tmp_path / "out")
    proc = run_cli("embed", str(cohort / "slides" / "a.svs"), "--out", str(out), *EMBED, "--slide-mpp", "0.25")
    assert proc.returncode == 1
    assert (f"error: {out / 'a.zarr'}: exists with another slide pixel size (the slide's own 0.499 µm/px, asked "
            "--slide-mpp 0.25); use --overwrite to rebuild it, or choose another --out") in proc.stderr
    from wsi_embed import EmbedOptions, embed_slide  # the same checks through the API: CLI starts cost seconds

    other, opts = tmp_path / "other", EmbedOptions(workers=0)
    assert embed_slide(sample_slide, other, [VIT], "random", opts, slide_mpp=0.5).status == "done"
    again = embed_slide(sample_slide, other, [VIT], "random", opts)
    assert again.status == "failed" and "(--slide-mpp 0.5, asked the slide's own pixel size)" in again.error
    assert embed_slide(sample_slide, other, [VIT], "random", opts, slide_mpp=0.5).status == "skipped"


def test_verify_of_a_temporary_store_or_of_a_folder_without_a_finished_one(cohort, tmp_path):
    out = _copy(cohort, tmp_path / "out")
    temp = out / f".a.zarr{_dead_suffix()}"
    shutil.copytree(out / "a.zarr", temp)
    proc = run_cli("verify", str(temp), "--repair")
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"error: {temp}: a temporary store of a run that "
                                                                   "did not finish, not a store")
    assert not list(out.glob(".a.zarr.tmp-*.zarr"))
    early = tmp_path / "early"
    early.mkdir()
    shutil.copytree(out / "a.zarr", early / temp.name)
    proc = run_cli("verify", str(early))
    assert proc.returncode == 1 and "no finished store in it yet" in proc.stderr


def test_a_loader_worker_killed_is_one_line():
    """The DataLoader's error for a worker killed by the kernel (out of memory) was a traceback."""
    from wsi_embed.errors import RunWideError
    from wsi_embed.pipeline import _next_item

    def killed():
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
        yield

    with pytest.raises(RunWideError, match=r"a loader worker process ended abruptly \(DataLoader worker \(pid\(s\) "
                                           r"4242\) exited unexpectedly\); completed stores are kept: rerun to resume"):
        _next_item(killed())
    assert _next_item(iter([])) is None


def test_a_repair_backup_holding_groups_the_store_lacks_is_kept(tmp_path):
    """A repair that died between the commits of two encoder groups: the store is back with one,
    and the backup, holding the other, is kept instead of being deleted as stale."""
    from wsi_embed.store import remove_stale_temporaries

    (tmp_path / "s.zarr" / "timm-a").mkdir(parents=True)
    backup = tmp_path / f".s.zarr.bad{_dead_suffix()}"
    for group in ("timm-a", "timm-b"):
        (backup / group).mkdir(parents=True)
    assert remove_stale_temporaries(tmp_path, "s") == [] and backup.is_dir()
    (tmp_path / "s.zarr" / "timm-b").mkdir()  # both groups back: the backup is stale now
    assert remove_stale_temporaries(tmp_path, "s") == [backup] and not backup.exists()


def test_a_current_export_is_not_read_again(cohort, tmp_path):
    """Files exported from the very same store are skipped before the store is checked chunk by
    chunk (a rerun over 10k done slides must not read them all again)."""
    out = _copy(cohort, tmp_path / "out")
    to = tmp_path / "to"
    assert run_cli("export", str(out), "--format", "clam", "--encoder", VIT, "--to", str(to)).returncode == 0
    chunk = next(p for p in (out / "a.zarr" / "timm-test_vit" / "embeddings" / "c").rglob("*") if p.is_file())
    chunk.unlink()  # damage only a full read shows; the exported file holds the embeddings as they were
    proc = run_cli("export", str(out), "--format", "clam", "--encoder", VIT, "--to", str(to))
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].startswith("skipped a: up to date at"), proc.stdout
    (to / "h5_files" / "a.h5").unlink()  # now a is exported again, and its damage is found
    proc = run_cli("export", str(out), "--format", "clam", "--encoder", VIT, "--to", str(to))
    assert proc.returncode == 1 and proc.stdout.splitlines()[0].startswith(f"error: {out / 'a.zarr'}: damaged")


def test_the_report_does_not_call_a_slide_complete_whose_locking_run_died(cohort, tmp_path):
    """Two runs at once, the first killed: the survivor skipped its slides as locked, and the report
    then counted them as complete before, though they have no store."""
    import csv

    out = _copy(cohort, tmp_path / "out")
    shutil.rmtree(out / "c.zarr")
    with (out / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # the killed run wrote no row for c; the survivor wrote only that c was locked
    locked = {**rows[-1], "slide_id": "c", "status": "skipped", "note": f"locked by somehost:{_dead_pid()}",
              "cells": "", "seconds": "", "store": "", "error": ""}
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([r for r in rows if r["slide_id"] != "c"] + [locked])
    proc = run_cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.html").read_text()
    assert "3: 2 done, 0 skipped (complete before), 1 failed" in page
    assert f"{out / 'c'}.zarr: not embedded: the run that held it (somehost:" in page
    import json
    import socket
    import time

    from wsi_embed.locks import lock_path

    lock_path(out, "c").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "started": time.time(), "token": "x"}))  # its run is alive
    assert run_cli("report", str(out)).returncode == 0
    page = (out / "report.html").read_text()
    assert "3: 2 done, 0 skipped (complete before), 1 being embedded by another run, 0 failed" in page


def test_verify_says_which_backups_hold_groups_and_removes_stale_ones(cohort, tmp_path, caplog):
    """A repair killed between two commits: verify said ok and nothing of the group left only in
    the backup; killed after its last commit, the backup stayed for ever."""
    out = _copy(cohort, tmp_path / "out")
    kept = out / f".a.zarr.bad{_dead_suffix()}"
    shutil.copytree(out / "a.zarr", kept)
    (kept / "timm-other").mkdir()  # a group the rebuilt store has not got back yet
    stale = out / f".b.zarr.bad{_dead_suffix()}"
    shutil.copytree(out / "b.zarr", stale)
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert kept.is_dir() and f"{kept}: kept: the store a repair was rebuilding when it stopped, holding encoder " \
                               "groups timm-other that" in proc.stderr
    assert not stale.exists()


def test_a_cluster_run_checks_the_grid_before_skipping(cohort, tmp_path):
    """The dask driver's resume check ran without the options: a store of another --mpp or
    --slide-mpp was skipped as complete."""
    from wsi_embed import EmbedOptions
    from wsi_embed.cohort.results import settled
    from wsi_embed.grid import GridSpec
    from wsi_embed.jobs import SlideJob

    out = _copy(cohort, tmp_path / "out")
    job = SlideJob(cohort / "slides" / "a.svs", "a")
    assert settled(job, out, [VIT], "random", EmbedOptions()).status == "skipped"
    other = settled(job, out, [VIT], "random", EmbedOptions(grid=GridSpec(mpp=1.0)))
    assert other.status == "failed" and "exists with another grid" in other.error
    mpp = settled(SlideJob(cohort / "slides" / "a.svs", "a", 0.6), out, [VIT], "random", EmbedOptions())
    assert mpp.status == "failed" and "another slide pixel size" in mpp.error


def test_a_repair_never_embeds_with_other_weights_than_recorded(sample_slide, tmp_path):
    """The weights file was changed since: the repair used it and said repaired."""
    import timm
    import torch

    weights = tmp_path / "w.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    out = tmp_path / "out"
    relative = os.path.relpath(weights, ROOT)  # as typed in the folder the run started from
    proc = run_cli("embed", str(sample_slide), "--out", str(out), "--model", "timm:test_resnet", "--weights",
                   relative, "--workers", "0", "--no-maps")
    assert proc.returncode == 0, proc.stderr
    store = out / "CMU-1-Small-Region.zarr"
    from wsi_embed import open_store

    assert open_store(store).encoder_attrs()["weights_path"] == str(weights)  # a repair from elsewhere finds it
    next(p for p in (store / "timm-test_resnet" / "embeddings" / "c").rglob("*") if p.is_file()).unlink()
    torch.manual_seed(2)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    proc = run_cli("verify", str(store), "--repair")
    assert proc.returncode == 1, proc.stdout
    assert f"not repaired: the weights {weights} for timm:test_resnet are not those it was made with" in proc.stdout
    weights.unlink()  # moved away: said so, not "cannot download the published weights"
    proc = run_cli("verify", str(store), "--repair")
    assert proc.returncode == 1 and f"{weights} (the weights timm:test_resnet was made with) is gone" in proc.stdout, proc.stdout


def test_the_qc_caption_lists_encoders_by_name():
    """A picture redrawn from a store (after a resume or a repair) listed the groups in zarr's order,
    which varies, and differed from the clean run's picture (--model order)."""
    from wsi_embed.qc import qc_title

    a = qc_title("s", 5, 224, 0.5, 0.25, [("timm:test_vit", True), ("timm:test_resnet", False)])
    b = qc_title("s", 5, 224, 0.5, 0.25, [("timm:test_resnet", False), ("timm:test_vit", True)])
    assert a == b and a.index("timm:test_resnet") < a.index("timm:test_vit (RANDOM WEIGHTS)")
