"""Cohort progress for the command line: bars on a terminal, one plain line per slide otherwise.

The CLI owns the streams it hands in; the library itself never prints. The per-slide bar is fed
by ``embed_slides``'s ``progress`` callback (:meth:`Progress.cells`).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..jobs import SlideResult


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Overall bar (slides, patches/s, ETA) plus a per-slide bar when ``bars``; else plain lines.

    ``bars=None`` means: bars when ``err`` is a terminal. ``slide_bar=False`` leaves out the
    per-slide bar (drivers that report whole slides only, like dask).
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
        self._current: tuple[str, int] | None = None  # (slide id, cells done) of the running slide
        self._overall = self._slide = None
        if self.bars:
            from tqdm import tqdm

            fmt = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} slides [{elapsed}{postfix}]"
            self._overall = tqdm(total=total, desc="cohort", file=self.err, position=0, bar_format=fmt,
                                 dynamic_ncols=True)
            # No rate here: the bar first hears of a slide after its first batch (the overall bar has it).
            self._slide = None if not slide_bar else tqdm(total=1, desc="starting", file=self.err, position=1, leave=False,
                               dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} patches")

    # -- callbacks ---------------------------------------------------------------------------
    def cells(self, slide_id: str, done: int, total: int) -> None:
        """``embed_slides(progress=...)``: cells done of the running slide."""
        self._current = (slide_id, done)
        if self._slide is not None:
            if self._slide.desc != slide_id or self._slide.total != total:
                self._slide.reset(total=max(1, total))
                self._slide.set_description_str(slide_id)
            self._slide.n = done
            self._slide.refresh()
            self._refresh_overall()

    def result(self, result: SlideResult, lines: list[str] = ()) -> None:
        """A slide finished (any status); ``lines`` are printed above the bars."""
        self.finished += 1
        if result.status != "skipped":
            self.worked += 1
        if result.status == "done":
            self.patches += result.cells
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
        """Patches per second over the run so far."""
        running = self._current[1] if self._current else 0
        elapsed = time.perf_counter() - self.started
        return (self.patches + running) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left: slides still to go times the wall time per slide that had work (skips are
        instant and would make it look too fast; wall time also covers parallel dask workers)."""
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
