"""Slides planned in processes (wsi_embed.planner) give the stores the prep thread gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wsi_embed import EmbedOptions, open_store
from wsi_embed.cohort import embed_cohort, plan_cohort

def test_planning_processes_give_the_thread_path_stores(tmp_path, sample_slide, painted_slide):
    slides = [sample_slide, painted_slide[0]]
    jobs = plan_cohort(slides)
    out = {}
    for n in (0, 1):
        opts = EmbedOptions(workers=0, prepare_processes=n, max_patches=12)
        summary = embed_cohort(jobs, tmp_path / f"out{n}", ["timm:test_vit"], "random", opts)
        assert summary.exit_code == 0
        out[n] = tmp_path / f"out{n}"
    for job in jobs:
        a, b = open_store(out[0] / f"{job.slide_id}.zarr"), open_store(out[1] / f"{job.slide_id}.zarr")
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.coords, b.coords)
        assert np.array_equal(a.embeddings()[...], b.embeddings()[...], equal_nan=True)
        assert a.attrs["tissue"] == b.attrs["tissue"]


def test_a_slide_that_fails_in_a_planning_process_fails_alone_in_one_line(tmp_path, sample_slide, painted_slide):
    """The first slide is planned in the prep thread, the next ones in a process: an error raised
    there comes back as that slide's one-line failure."""
    masks = tmp_path / "masks"
    masks.mkdir()
    jobs = plan_cohort([sample_slide, painted_slide[0]])
    opts = EmbedOptions(workers=0, prepare_processes=1, max_patches=6, tissue_mask=str(masks))
    summary = embed_cohort(jobs, tmp_path / "out", ["timm:test_vit"], "random", opts)
    errors = [r.error for r in summary.results]
    assert summary.exit_code == 1 and len(errors) == 2
    for job, error in zip(jobs, errors):
        assert error == (f"{masks}: no tissue mask for slide {job.slide_id} (looked for {job.slide_id}.png|.tif|.tiff); "
                         "add it, or give this slide's file in the --list CSV")


@pytest.mark.slow  # in -m slow: keeps CI under 15 minutes
def test_a_script_without_a_main_guard_still_embeds_once(tmp_path, sample_slide, painted_slide):
    """A planning process imports the calling script again: one without `if __name__ == "__main__":`
    must not start a second run there. That process refuses with a line saying what to do, and the
    real run plans in its own thread and finishes every slide (paths given as str work too)."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "from wsi_embed import EmbedOptions, SlideJob, embed_slides\n"
        f"jobs = [SlideJob({str(sample_slide)!r}, 'a'), SlideJob({str(painted_slide[0])!r}, 'b')]\n"
        "opts = EmbedOptions(workers=0, prepare_processes=1, max_patches=4)\n"
        "print('STATUS', [r.status for r in embed_slides(jobs, 'out', ['timm:test_vit'], 'random', opts)])\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("STATUS") == 1 and "STATUS ['done', 'done']" in proc.stdout
    assert 'call it under `if __name__ == "__main__":`' in proc.stderr
    assert "unexpected error" not in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.zarr")) == ["a.zarr", "b.zarr"]


def test_planning_processes_run_below_the_process_that_feeds_the_encoder():
    """They fill the gaps on a small CPU host instead of preempting the encoder's threads."""
    import os

    from wsi_embed.planner import BACKGROUND_NICE, Planner

    planner = Planner(processes=1)
    try:
        child = planner._executor().submit(os.nice, 0).result(timeout=60)
    finally:
        planner.close()
    assert child == min(19, os.nice(0) + BACKGROUND_NICE)


def test_ctrl_c_while_a_planning_process_starts_does_not_reach_it():
    """A terminal's Ctrl-C goes to the whole process group; a planning process still importing
    printed a traceback and broke the pool. Here it gets SIGINT every 2 ms from its first moment."""
    import os
    import signal
    import threading
    import time

    from wsi_embed.planner import Planner, _submit

    planner = Planner(processes=1)
    pool, done, sent = planner._executor(), threading.Event(), []

    def interrupt():
        while not done.is_set():
            for pid in list(pool._processes or {}):
                try:
                    os.kill(pid, signal.SIGINT)
                    sent.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    try:
        assert _submit(pool, os.getpid).result(timeout=60) > 0
    finally:
        done.set()
        watcher.join()
        planner.close()
    assert len(sent) > 10  # it was interrupted all through its start


def test_planning_processes_end_when_the_run_is_killed(tmp_path):
    """kill -9 never shuts the pool down; the planning process must not wait for work for ever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys, time\n"
        "from wsi_embed.planner import Planner\n"
        "if __name__ == '__main__':\n"
        "    planner = Planner(processes=1)\n"
        "    print(planner._executor().submit(os.getpid).result(timeout=60), flush=True)\n"
        "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        child = int(proc.stdout.readline())
        os.kill(child, 0)  # alive while the run is
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.2)
        assert not _alive(child), "the planning process outlived the killed run"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
