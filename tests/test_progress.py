"""Cohort progress on a (fake) terminal: log lines beside the bars, patch-rate ETA, lazy slide bar."""

from __future__ import annotations

import io
import logging
import re
import types

import pytest

from wsi_embed.cohort import progress as progress_mod
from wsi_embed.cohort.progress import BarLogHandler, Progress
from wsi_embed.jobs import SlideResult

FORMAT = "%(levelname)s %(name)s: %(message)s"  # as the CLI's _setup_logging


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_mod, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


@pytest.fixture
def console(monkeypatch):
    """A fake terminal on stderr, with the root logger writing to it (like logging.basicConfig)."""
    err = io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if h.__class__.__name__ == "LogCaptureHandler"]
                        + [handler])
    return err, handler


def screen_lines(text: str) -> list[str]:
    """What a terminal shows of each line: the text after the last carriage return, cursor moves dropped."""
    return [re.sub(r"\x1b\[[0-9]*[A-Za-z]", "", line).split("\r")[-1] for line in text.split("\n")]


def done(slide_id: str, cells: int) -> SlideResult:
    return SlideResult(path=f"{slide_id}.svs", slide_id=slide_id, status="done", cells=cells)


def test_log_record_gets_its_own_line_while_bars_are_shown(clock, console):
    err, handler = console
    progress = Progress(3, out=io.StringIO(), err=err, bars=True)
    try:
        assert not any(isinstance(h, logging.StreamHandler) and h.stream is err and not isinstance(h, BarLogHandler)
                       for h in logging.getLogger().handlers)
        clock[0] = 5.0
        progress.cells("a", 64, 256)
        logging.getLogger("wsi_embed.test").warning("weights are random")
        lines = screen_lines(err.getvalue())
        assert "WARNING wsi_embed.test: weights are random" in lines
        assert not any("weights are random" in line and "slides" in line for line in lines)
    finally:
        progress.close()
    assert handler in logging.getLogger().handlers  # restored on close
    assert not any(isinstance(h, BarLogHandler) for h in logging.getLogger().handlers)
    logging.getLogger("wsi_embed.test").warning("after")
    assert screen_lines(err.getvalue())[-2] == "WARNING wsi_embed.test: after"


def test_plain_lines_leave_logging_alone(console):
    err, handler = console
    before = list(logging.getLogger().handlers)
    progress = Progress(1, out=io.StringIO(), err=err, bars=False)
    assert logging.getLogger().handlers == before
    progress.close()
    assert logging.getLogger().handlers == before


def test_slide_bar_appears_with_work_and_shows_rate_and_eta(clock, console):
    err, _ = console
    progress = Progress(2, out=io.StringIO(), err=err, bars=True)
    try:
        assert "patches" not in err.getvalue() and "starting" not in err.getvalue()  # no placeholder bar
        clock[0] = 10.0
        progress.cells("a", 100, 400)  # 10 patches/s over the run's wall time; 300 left -> 30 s
        drawn = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9]*[A-Za-z]", "", err.getvalue()))
        slide_lines = [line for line in drawn if line.startswith("a:")]
        assert slide_lines and "100/400 patches, 10.0 patches/s, ETA 0:00:30" in slide_lines[-1]
    finally:
        progress.close()


def test_eta_follows_patch_rate(clock):
    progress = Progress(3, out=io.StringIO(), err=io.StringIO(), bars=False)
    assert progress.eta() is None  # nothing known yet
    clock[0] = 10.0
    progress.cells("a", 100, 400)  # 10 patches/s; left: 300 of a + 2 slides like a (800)
    assert progress.rate() == pytest.approx(10.0)
    assert progress.eta() == pytest.approx(110.0)
    clock[0] = 20.0
    progress.cells("a", 200, 400)
    assert progress.eta() == pytest.approx(100.0)  # goes down while the slide runs
    clock[0] = 40.0
    progress.cells("a", 400, 400)
    progress.result(done("a", 400))
    assert progress.eta() == pytest.approx(80.0)  # 2 slides x 400 patches at 10/s
    clock[0] = 45.0
    progress.cells("b", 50, 200)  # 450 patches in 45 s; left: 150 of b + 1 slide of (400+200)/2
    assert progress.eta() == pytest.approx(45.0)
    clock[0] = 60.0
    progress.cells("b", 200, 200)
    progress.result(done("b", 200))
    assert progress.eta() == pytest.approx(300 / 10.0)


def test_eta_falls_back_to_slides_without_patch_counts(clock):
    progress = Progress(4, out=io.StringIO(), err=io.StringIO(), bars=False)
    progress.result(SlideResult(path="s.svs", slide_id="s", status="skipped"))
    assert progress.eta() is None  # skips are instant: they say nothing about the time per slide
    clock[0] = 30.0
    progress.result(SlideResult(path="f.svs", slide_id="f", status="failed", error="bad"))
    assert progress.eta() == pytest.approx(2 * 30.0)


def test_plain_line_carries_patch_rate_eta(clock):
    out = io.StringIO()
    progress = Progress(2, out=out, err=io.StringIO(), bars=False)
    clock[0] = 10.0
    progress.cells("a", 100, 100)
    progress.result(done("a", 100), ["done    a: 100 cells in 10.0 s"])
    assert out.getvalue() == "done    a: 100 cells in 10.0 s  [1/2, ETA 0:00:10]\n"
