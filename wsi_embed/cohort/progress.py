"""Cohort progress for the command line: bars on a terminal, one plain line per slide otherwise.

The CLI owns the streams it hands in; the library itself never prints. The per-slide bar is fed
by ``embed_slides``'s ``progress`` callback (:meth:`Progress.cells`). While bars are shown, console
log records go through tqdm's writer (:class:`BarLogHandler`), so they land on their own lines
instead of inside a bar.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from ..jobs import SlideResult


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class BarLogHandler(logging.Handler):
    """Writes log records with ``tqdm.write``: the bars are cleared, the line written, the bars redrawn."""

    def __init__(self, stream: TextIO, level: int = logging.NOTSET):
        super().__init__(level)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


class Progress:
    """Overall bar (slides, patches/s, ETA) plus a per-slide bar when ``bars``; else plain lines.

    ``bars=None`` means: bars when ``err`` is a terminal. ``slide_bar=False`` leaves out the
    per-slide bar (drivers that report whole slides only, like dask). The per-slide bar appears
    when a slide first reports embedded patches.

    Rates are patches per second over the run's wall time (slides overlap: the next one is prepared
    while one computes, so per-slide seconds would mislead). The ETA is patches still to do over that
    rate once a slide has reported its patch count (slides not started yet count as the average
    slide so far); before that it is slides still to go times the wall time per slide.
    """

    def __init__(self, total: int, *, out: TextIO | None = None, err: TextIO | None = None,
                 bars: bool | None = None, slide_bar: bool = True):
        self.total = total
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.bars = self.err.isatty() if bars is None else bars
        self.started = time.perf_counter()
        self.finished = 0
        self.worked = 0  # slides that were embedded or failed (skips are instant: not in the ETA)
        self.patches = 0  # patches embedded by finished slides
        self.sized = 0  # finished slides whose patch count is known (done, with patches)
        self._current: tuple[str, int, int] | None = None  # (slide id, done, total) of the running slide
        self._overall = self._slide = None
        self._want_slide_bar = slide_bar
        self._log_swap: list[tuple[logging.Handler | None, BarLogHandler]] = []  # (replaced, ours)
        if self.bars:
            from tqdm import tqdm

            fmt = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} slides [{elapsed}{postfix}]"
            self._overall = tqdm(total=total, desc="cohort", file=self.err, position=0, bar_format=fmt,
                                 dynamic_ncols=True)
            self._route_logging()

    # -- logging while bars are shown ---------------------------------------------------------
    def _is_console(self, handler: logging.Handler) -> bool:
        return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                and getattr(handler, "stream", None) in (sys.stderr, sys.stdout, self.err))

    def _route_logging(self) -> None:
        """Swap the root logger's console handlers for :class:`BarLogHandler` s (same stream, level,
        format and filters); with no handler at all, stand in for logging's last resort (WARNING)."""
        root = logging.getLogger()
        if not root.handlers:
            self._log_swap.append((None, BarLogHandler(self.err, logging.WARNING)))
        for handler in list(root.handlers):
            if self._is_console(handler):
                bar = BarLogHandler(handler.stream, handler.level)
                bar.setFormatter(handler.formatter)
                for flt in handler.filters:
                    bar.addFilter(flt)
                self._log_swap.append((handler, bar))
        for old, new in self._log_swap:
            if old is not None:
                root.removeHandler(old)
            root.addHandler(new)

    def _restore_logging(self) -> None:
        root = logging.getLogger()
        for old, new in self._log_swap:
            root.removeHandler(new)
            if old is not None:
                root.addHandler(old)
        self._log_swap = []

    # -- callbacks ---------------------------------------------------------------------------
    def cells(self, slide_id: str, done: int, total: int) -> None:
        """``embed_slides(progress=...)``: cells done of the running slide."""
        self._current = (slide_id, done, total)
        if not self.bars:
            return
        if self._want_slide_bar:
            rate = self.rate()
            postfix = f"{rate:.1f} patches/s, ETA {_hms((total - done) / rate) if rate > 0 else '?'}"
            if self._slide is None:  # only now: a slide has work
                from tqdm import tqdm

                self._slide = tqdm(total=max(1, total), initial=done, desc=slide_id, postfix=postfix,
                                   file=self.err, position=1, leave=False, dynamic_ncols=True,
                                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} patches{postfix}")
            else:  # one redraw (its format uses none of tqdm's own timing, so no reset)
                self._slide.set_description_str(slide_id, refresh=False)
                self._slide.total, self._slide.n = max(1, total), done
                self._slide.set_postfix_str(postfix, refresh=True)
        self._refresh_overall()

    def result(self, result: SlideResult, lines: list[str] = ()) -> None:
        """A slide finished (any status); ``lines`` are printed above the bars."""
        self.finished += 1
        if result.status != "skipped":
            self.worked += 1
        if result.status == "done":
            self.patches += result.cells
            self.sized += int(result.cells > 0)
        self._current = None
        stream = lambda line: self.err if line.startswith("error:") else self.out  # noqa: E731
        if self.bars:
            from tqdm import tqdm

            for line in lines:
                tqdm.write(line, file=stream(line))
            self._overall.update(1)
            self._refresh_overall()
        else:  # plain lines (logs, pipes): the count and ETA ride on the slide's first line
            eta = self.eta()
            tail = f"  [{self.finished}/{self.total}" + (f", ETA {_hms(eta)}]" if eta is not None else "]")
            for i, line in enumerate(lines):
                print(line + (tail if i == 0 and not line.startswith("error:") else ""), file=stream(line),
                      flush=True)

    # -- figures -----------------------------------------------------------------------------
    def rate(self) -> float:
        """Patches per second over the run's wall time so far."""
        running = self._current[1] if self._current else 0
        elapsed = time.perf_counter() - self.started
        return (self.patches + running) / elapsed if elapsed > 0 else 0.0

    def patches_left(self) -> float | None:
        """Patches still to embed: the rest of the running slide, plus the average slide so far for
        each slide not started yet; None before any slide has reported its patch count."""
        sized, known = self.sized, self.patches
        running_left, running = 0, 0
        if self._current is not None and self._current[2] > 0:
            sized, known = sized + 1, known + self._current[2]
            running_left, running = max(0, self._current[2] - self._current[1]), 1
        if not sized:
            return None
        not_started = max(0, self.total - self.finished - running)
        return running_left + not_started * known / sized

    def eta(self) -> float | None:
        """Seconds left: patches still to do over the patch rate; before patch counts are known, slides
        still to go times the wall time per slide that had work (skips are instant and would make it
        look too fast; wall time also covers parallel dask workers)."""
        left, rate = self.patches_left(), self.rate()
        if left is not None and rate > 0:
            return left / rate
        if not self.worked:
            return None
        return (self.total - self.finished) * (time.perf_counter() - self.started) / self.worked

    def _refresh_overall(self) -> None:
        if self._overall is None:
            return
        eta = self.eta()
        self._overall.set_postfix_str(f"{self.rate():.1f} patches/s, ETA {_hms(eta) if eta is not None else '?'}",
                                      refresh=True)

    def close(self) -> None:
        for bar in (self._slide, self._overall):
            if bar is not None:
                bar.close()
        self._slide = self._overall = None
        self._restore_logging()
