"""Resume decided by provenance, and what a run leaves behind when something goes wrong: random or
other weights are redone, a different file under the same id is a conflict, a file that changes
while it is read is not committed, a killed owner's leftovers are cleared, full disks fail one slide
in one line, limits refuse absurd grids, and SIGTERM ends a run within seconds at any stage."""

from __future__ import annotations

import dataclasses

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, run_cli
from wsi_embed import EmbedOptions, embed_slide, open_store
from wsi_embed.errors import InvalidOption
from wsi_embed.jobs import SlideJob

MODEL = "timm:test_vit"
FAST = EmbedOptions(workers=0, max_patches=6)
CLI_FAST = ("--model", MODEL, "--weights", "random", "--workers", "0")


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """Two weight files for timm:test_vit, as a user would pass them with --weights PATH."""
    from wsi_embed.encoders.build import build_module
    from wsi_embed.encoders.registry import get_config

    folder = tmp_path_factory.mktemp("vit_weights")
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = folder / f"vit-{seed}.pth"
        torch.save(build_module(get_config(MODEL)).state_dict(), path)
        files.append(str(path))
    return files


@pytest.fixture()
def slide_copy(sample_slide, tmp_path):
    path = tmp_path / "slides" / "s1.svs"
    path.parent.mkdir()
    shutil.copy(sample_slide, path)
    return path


def test_random_or_other_weights_are_redone(slide_copy, tmp_path, vit_weights):
    out = tmp_path / "out"
    first = embed_slide(slide_copy, out, [MODEL], "random", FAST)
    assert first.status == "done" and open_store(first.store).encoder_attrs()["weights_random"] is True

    real = embed_slide(slide_copy, out, [MODEL], vit_weights[0], FAST)
    assert real.status == "done" and "random weights" in real.note
    attrs = open_store(real.store).encoder_attrs()
    assert attrs["weights_random"] is False and attrs["weights_path"] == vit_weights[0]

    other = embed_slide(slide_copy, out, [MODEL], vit_weights[1], FAST)
    assert other.status == "done" and "other weights" in other.note
    assert open_store(other.store).encoder_attrs()["weights_path"] == vit_weights[1]

    assert embed_slide(slide_copy, out, [MODEL], vit_weights[1], FAST).status == "skipped"
    # a smoke test never replaces real embeddings
    assert embed_slide(slide_copy, out, [MODEL], "random", FAST).status == "skipped"
    assert open_store(other.store).encoder_attrs()["weights_random"] is False
    # weights that cannot be hashed before they are fetched (auto, a URL not cached): the request must match
    from wsi_embed.resume import _same_request, plan_resume

    job = SlideJob(slide_copy, "s1")
    for spec in ("auto", "https://lab.invalid/exp2/checkpoint.pth"):
        resume = plan_resume(out, job, [MODEL], spec, options=FAST)
        assert resume.todo == [MODEL] and resume.note == (f"its {MODEL} embeddings were made with --weights "
                                                          f"{vit_weights[1]}, asked --weights {spec}"), resume
    url = "https://lab.invalid/exp1/checkpoint.pth"
    assert _same_request({"weights_spec": "auto"}, "AUTO") and _same_request({"weights_url": url}, url)
    assert not _same_request({"weights_spec": "auto", "weights_url": url}, url.replace("exp1", "exp2"))


def test_a_complete_store_kept_despite_another_dtype_says_so(slide_copy, tmp_path):
    out = tmp_path / "out"
    assert embed_slide(slide_copy, out, [MODEL], "random", FAST).status == "done"
    again = embed_slide(slide_copy, out, [MODEL], "random", dataclasses.replace(FAST, dtype="float32",
                                                                                 precision="fp32"))
    assert again.status == "skipped", again
    assert again.note == (f"complete (its {MODEL} embeddings are float16, asked --dtype float32; "
                          "--overwrite redoes it)")
    assert open_store(again.store).encoder_attrs()["dtype"] == "float16"
    assert embed_slide(slide_copy, out, [MODEL], "random", FAST).note == "complete"


def test_another_file_under_the_same_id_is_a_conflict(slide_copy, painted_slide, tmp_path):
    out = tmp_path / "out"
    assert embed_slide(slide_copy, out, [MODEL], "random", FAST).status == "done"
    before = json.loads((out / "s1.zarr" / "zarr.json").read_text())["attributes"]["slide"]["fingerprint"]
    other = tmp_path / "other" / "s1.tif"
    other.parent.mkdir()
    shutil.copy(painted_slide[0], other)
    proc = run_cli("embed", str(other), "--out", str(out), *CLI_FAST)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert str(other) in line and "--overwrite" in line and "slide_id" in line
    after = json.loads((out / "s1.zarr" / "zarr.json").read_text())["attributes"]["slide"]["fingerprint"]
    assert after == before
    # a path that does not exist is not "complete", even though a store has its id
    missing = embed_slide(tmp_path / "gone" / "s1.svs", out, [MODEL], "random", FAST)
    assert missing.status == "failed" and "no such file" in missing.error


def test_other_grid_or_tissue_options_are_a_conflict_until_overwrite(slide_copy, tmp_path):
    """A complete store stands only for the options it was made with: another grid, pen-mark rule,
    annotation file or drop rule is not "complete" (it would silently keep the old cells)."""
    out = tmp_path / "out"
    assert embed_slide(slide_copy, out, [MODEL], "random", FAST).status == "done"
    geojson = tmp_path / "s1.geojson"
    geojson.write_text(json.dumps({"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
                                   "geometry": {"type": "Polygon", "coordinates": [[[200, 200], [1500, 200],
                                                                                    [1500, 2000], [200, 200]]]}}))
    from wsi_embed.grid import GridSpec
    from wsi_embed.tissue import TissueParams

    others = (dataclasses.replace(FAST, grid=GridSpec(mpp=1.0)),
              dataclasses.replace(FAST, tissue=TissueParams(pen_marks="keep")),
              dataclasses.replace(FAST, annotations=str(geojson)))
    for opts in others:
        again = embed_slide(slide_copy, out, [MODEL], "random", opts)
        assert again.status == "failed" and "--overwrite" in again.error, opts
    # the CLI: one line, exit 1, the store untouched
    again = run_cli("embed", str(slide_copy), "--out", str(out), *CLI_FAST, "--drop-blank")
    (line,) = [ln for ln in again.stderr.splitlines() if ln.startswith("error:")]
    assert again.returncode == 1 and "--overwrite" in line and "Traceback" not in again.stderr
    assert open_store(out / "s1.zarr").attrs["tissue"]["pen_marks"] == "remove"
    redo = embed_slide(slide_copy, out, [MODEL], "random", dataclasses.replace(others[2], overwrite=True))
    assert redo.status == "done", redo.error
    tissue = open_store(out / "s1.zarr").attrs["tissue"]
    assert tissue["annotations"]["path"] == str(geojson.resolve())
    # the same options again: complete, skipped
    assert embed_slide(slide_copy, out, [MODEL], "random", others[2]).status == "skipped"


def test_a_slide_that_changes_while_embedded_is_not_committed(slide_copy, tmp_path):
    from wsi_embed.pipeline import embed_slides

    out = tmp_path / "out"
    touched = []

    def rewrite(slide_id, done, total):  # another program rewrites the file mid-slide
        if not touched:
            with open(slide_copy, "ab") as f:
                f.write(b"\0" * 4096)
            touched.append(done)

    opts = EmbedOptions(workers=0, batch_size=4, block=4)
    (result,) = list(embed_slides([SlideJob(slide_copy, "s1")], out, [MODEL], "random", opts, progress=rewrite))
    assert touched and result.status == "failed" and "changed while" in result.error
    assert not (out / "s1.zarr").exists() and not list(out.glob(".s1*"))


def test_a_killed_owners_leftovers_are_cleared_on_resume(slide_copy, tmp_path):
    out = tmp_path / "out"
    done = embed_slide(slide_copy, out, [MODEL], "random", FAST)
    qc = out / "s1.qc.png"
    assert done.status == "done" and qc.exists()
    # kill -9 between the store's rename and the QC picture: a lock of a dead pid and a temporary picture
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".s1.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                              "started": time.time(), "token": "x"}))
    (out / f".s1.qc.png.tmp-{dead.pid}").write_bytes(b"half a png")
    qc.unlink()
    again = embed_slide(slide_copy, out, [MODEL], "random", FAST)
    assert again.status == "skipped"
    assert qc.exists() and not (out / ".s1.lock").exists() and not list(out.glob(".s1.qc.png.tmp-*"))


def test_a_dead_runs_temporary_store_goes_even_without_its_lock(slide_copy, tmp_path):
    """The locks deleted by hand after a crash: the complete slide is skipped, so only a sweep of
    dead owners' temporaries (verify --repair, the end of an embed run) removes its leftover."""
    out = tmp_path / "out"
    assert embed_slide(slide_copy, out, [MODEL], "random", FAST).status == "done"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    orphan = out / f".s1.zarr.tmp-{host}-{dead.pid}-abcdef"
    shutil.copytree(out / "s1.zarr", orphan)
    live = out / f".s1.zarr.tmp-{host}-{os.getpid()}-abcdef"  # a run still going on this host
    live.mkdir()
    proc = run_cli("verify", str(orphan))
    assert proc.returncode == 1 and "verify --repair on the folder to remove it" in proc.stderr, proc.stderr
    proc = run_cli("verify", str(out), "--repair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not orphan.exists() and live.is_dir() and (out / "s1.zarr").is_dir()


def test_full_disk_fails_one_slide_in_one_line(slide_copy, tmp_path, monkeypatch, caplog):
    from wsi_embed import store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(store.StoreWriter, "create", full)
        result = embed_slide(slide_copy, out, [MODEL], "random", FAST)
    assert result.status == "failed" and "No space left on device" in result.error and "free space" in result.error
    assert not any(r.exc_info for r in caplog.records), "no traceback for a full disk"
    assert not list(out.glob("*.zarr")) and not list(out.glob(".*"))

    # the QC picture: the store is complete, the picture is drawn by the next run
    with monkeypatch.context() as m:
        m.setattr("PIL.Image.Image.save", full)
        result = embed_slide(slide_copy, out, [MODEL], "random", FAST)
    assert result.status == "done" and not (out / "s1.qc.png").exists()  # the picture is written off-thread
    assert not list(out.glob(".*"))
    assert embed_slide(slide_copy, out, [MODEL], "random", FAST).status == "skipped"
    assert (out / "s1.qc.png").exists()


def test_limits_and_options_are_checked(slide_copy, tmp_path):
    result = embed_slide(slide_copy, tmp_path / "out", [MODEL], "random", EmbedOptions(workers=0, max_cells=10))
    assert result.status == "failed" and "--max-cells" in result.error and str(slide_copy) in result.error
    assert "check --mpp and --stride" in result.error
    assert not list((tmp_path / "out").glob("*.zarr"))
    with pytest.raises(InvalidOption, match="--lock-stale-after"):
        EmbedOptions(lock_stale_after=-5)
    with pytest.raises(InvalidOption, match="--lock-stale-after 2 is under 120 s: a running process refreshes"):
        EmbedOptions(lock_stale_after=2)  # another host would take live slides over
    assert EmbedOptions(lock_stale_after=120).lock_stale_after == 120


@pytest.mark.parametrize("args, text", [
    (("--model", "no-such-model", "--weights", "random"), "no-such-model"),
    (("--model", MODEL, "--weights", "random", "--device", "cuda:7"), "--device"),
    (("--model", MODEL, "--weights", "random", "--precision", "fp8"), "--precision"),
    (("--model", MODEL, "--weights", "random", "--device", "cpu", "--decode", "gpu"), "--decode gpu"),
    (("--model", f"{MODEL},{MODEL}", "--weights", "random"), "named twice"),
    (("--model", "timm:vit_small_patch16_224.badtag", "--weights", "random"), "no pretrained tag 'badtag'"),
    (("--model", f"{MODEL},timm:test_resnet", "--weights", __file__), "one weights file for 2 models"),
])
def test_the_first_screen_validates_before_the_banner(slide_copy, tmp_path, args, text):
    out = tmp_path / "out"
    proc = run_cli("embed", str(slide_copy), "--out", str(out), *args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "RANDOM WEIGHTS" not in proc.stderr and text in proc.stderr
    assert not out.exists()


def test_sigterm_during_preparation_ends_the_run_within_seconds(sample_slide, tmp_path):
    """A slide whose preparation takes long (here: thousands of tiny cells) still stops at SIGTERM,
    and the --out folders it made, with nothing in them, go with it."""
    out = tmp_path / "new" / "out"
    args = [sys.executable, "-m", "wsi_embed.cli", "embed", str(sample_slide), "--out", str(out), *CLI_FAST,
            "--patch-size", "8", "--mpp", "0.25"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".*.lock")):
        time.sleep(0.02)  # the slide is locked: its preparation has started
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "SIGTERM took too long"
    assert proc.returncode == 130 and "interrupted" in err, err
    assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))


def test_ctrl_c_in_a_cohort_prints_one_line_and_no_traceback(sample_slide, tmp_path):
    """Ctrl-C reaches the whole process group, slide-planning processes included: only the run's own
    "interrupted" line is printed, and only complete stores are left."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(4):
        shutil.copy(sample_slide, slides / f"s{i}.svs")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "wsi_embed.cli", "embed", str(slides), "--out", str(out), *CLI_FAST,
            "--patch-size", "32", "--prepare-processes", "1"]
    # a shell running the tests in the background ignores SIGINT, and its children inherit that
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*.zarr")):
        time.sleep(0.05)  # the first slide is done: the next ones are being planned in a process
    time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; completed stores are kept, rerun to resume" in err, err
    assert "Traceback" not in err, err
    for store in out.glob("*.zarr"):
        assert open_store(store, verify=True).attrs["wsi_embed"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".zarr")]


def test_only_embed_says_completed_stores_are_kept():
    from wsi_embed.cli import _interrupted_line

    assert "rerun to resume" in _interrupted_line(["wsi-embed", "embed", "s.svs", "--out", "o"])
    assert _interrupted_line(["wsi-embed", "bench", "s.svs"]) == "interrupted"  # a bench keeps no store
    assert _interrupted_line(["wsi-embed"]) == "interrupted"
