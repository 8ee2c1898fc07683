"""The cohort report ``<out>/report.html``, the run record ``<out>/runs.jsonl`` and the end of a run.

- :func:`finish_run` is what ``wsi-embed embed`` calls after a cohort run: one line appended to
  ``runs.jsonl``, the embedding maps of the slides this run embedded (one PCA per encoder fitted on a
  sample of them), then ``report.html``. A failure in any of these is one warning line: the stores
  are complete and the run's exit status does not change.
- :func:`write_report` builds ``report.html`` from the manifest(s), ``runs.jsonl`` and the pictures
  in the folder (one ``os.scandir``; no store is opened, so 2,000 slides take well under a second).

The page is one file with a little inline CSS and JS, no network: pictures are relative links to the
PNGs beside it (``loading="lazy"``, in fixed-size boxes so only the visible ones load). Rows are
sortable (click a column) and filterable (text and status); failures are listed first with their
error line and the fix it suggests.

``runs.jsonl``: one JSON object per finished ``embed`` run, appended in one write (several shards
may finish at once): ``finished``, ``seconds``, ``slides``, ``done``, ``skipped``, ``failed``,
``locked``, ``cells``, ``patches_per_s``, ``manifest``, ``version`` and ``machine`` (``host``,
``cpu``, ``cores``, ``memory_gb``, ``gpu``, ``platform``, ``python``).
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from . import __version__
from .atomic import append_whole, write_atomic
from .machine import machine_info
from .errors import WsiEmbedError
from .locks import held_by_a_live_run
from .store import (completed_encoders, existing_output_folder, group_name, is_temporary, remove_dead_temporaries,
                    store_slide_id)

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
RUNS_NAME = "runs.jsonl"
ATTENTION_DIR = "attention"  # workflows/train_abmil.py writes <dir>/attention/<slide_id>.attention.png


class NotAnOutputFolder(WsiEmbedError, NotADirectoryError):
    """``wsi-embed report OUT`` on something that is not an output folder."""


# -- the run record --------------------------------------------------------------------------------
def run_record(summary) -> dict:
    """The ``runs.jsonl`` line of a finished :class:`~wsi_embed.cohort.results.CohortSummary`."""
    rate = summary.cells / summary.seconds if summary.cells and summary.seconds else None
    return {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(summary.seconds, 3),
            "slides": summary.total, "done": summary.done, "skipped": summary.skipped, "failed": summary.failed,
            "locked": summary.locked, "cells": summary.cells,
            "patches_per_s": None if rate is None else round(rate, 2),
            "manifest": str(Path(summary.manifest).absolute()) if summary.manifest else None,  # any cwd
            "version": __version__,
            "machine": machine_info()}


def append_run(out_dir: Path, record: dict) -> Path:
    """Append one line to ``runs.jsonl``, whole or not at all (see :func:`~wsi_embed.atomic.append_whole`)."""
    path = Path(out_dir) / RUNS_NAME
    append_whole(path, lambda size: (json.dumps(record) + "\n").encode())
    return path


def read_runs(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / RUNS_NAME
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a full disk: skip it
            continue
        if isinstance(row, dict):
            runs.append(row)
    return runs


# -- the end of a run ------------------------------------------------------------------------------
@dataclass
class RunExtras:
    report: Path | None = None
    maps: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _warn(extras: RunExtras, text: str) -> None:
    extras.warnings.append(text)
    log.warning("%s", text)


def finish_run(out_dir: str | os.PathLike, summary, *, maps: bool = True, clusters: int | None = None,
               attention: str | os.PathLike | None = None) -> RunExtras:
    """After a cohort run: the run record, the maps of this run's done slides (PCA fitted on a
    sample of all of them), and ``report.html``. Never raises for a picture or a page: each problem
    is one warning line (logged, and in :attr:`RunExtras.warnings`)."""
    out_dir = Path(out_dir).absolute()
    extras = RunExtras()
    for path in remove_dead_temporaries(out_dir):
        log.info("removed %s, left by a run that ended", path)
    try:
        append_run(out_dir, run_record(summary))
    except OSError as exc:
        _warn(extras, f"{out_dir / RUNS_NAME}: the run record cannot be written ({exc.strerror or exc})")
    if maps:
        from .maps import map_path_for, write_maps

        def lacks_a_map(r) -> bool:  # e.g. done just before an interrupt: the resumed run draws it
            return r.cells > 0 and any(not map_path_for(out_dir, r.slide_id, enc).exists() for enc in r.encoders)

        complete = [r for r in summary.results if r.store and r.status in ("done", "skipped")]
        if any(r.status == "skipped" and lacks_a_map(r) for r in complete):
            # a run stopped before its maps: draw them all again, fitted on the same slides as
            # that run would have, so one colour still means one embedding on every slide
            stores = [r.store for r in complete]
        else:
            stores = [r.store for r in complete if r.status == "done"]
        try:
            result = write_maps(stores, clusters=clusters, cohort=True)
            extras.maps = result.written
            for problem in result.problems:
                _warn(extras, problem)
        except Exception as exc:  # noqa: BLE001 - a picture must never fail a finished run
            log.debug("embedding maps failed", exc_info=True)
            _warn(extras, f"{out_dir}: embedding maps not drawn ({type(exc).__name__}: {exc}); "
                          f"the stores are complete; draw them with: wsi-embed report {out_dir} --maps")
    try:
        extras.report = write_report(out_dir, attention=attention,
                                     manifests=[summary.manifest] if summary.manifest else None)
    except Exception as exc:  # noqa: BLE001 - the page must never fail a finished run
        log.debug("report failed", exc_info=True)
        _warn(extras, f"{out_dir / REPORT_NAME}: not written ({type(exc).__name__}: {exc}); "
                      f"the stores are complete; retry with: wsi-embed report {out_dir}")
    return extras


# -- collecting ------------------------------------------------------------------------------------
@dataclass
class Row:
    slide_id: str
    status: str
    error: str = ""
    fix: str = ""
    note: str = ""
    cells: int | None = None
    seconds: float | None = None
    encoders: list[str] = field(default_factory=list)
    qc: str | None = None  # file names relative to the report
    maps: list[tuple[str, str]] = field(default_factory=list)  # (encoder, href)
    clusters: list[tuple[str, str]] = field(default_factory=list)
    attention: str | None = None
    timestamp: str = ""


def split_fix(error: str) -> str:
    """The fix an error line suggests: our messages end with '; <what to do>'."""
    return error.rsplit("; ", 1)[1].strip() if "; " in error else ""


def _int(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _manifests(out_dir: Path, runs: list[dict], given: Sequence[os.PathLike] | None) -> list[Path]:
    paths = [Path(p) for p in given or ()]
    paths += [Path(r["manifest"]) for r in runs if r.get("manifest")]
    paths += [out_dir / "manifest.csv", out_dir / "manifest.jsonl"]
    seen, out = set(), []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen and p.is_file():
            seen.add(key)
            out.append(p)
    return out


def _attention_dirs(out_dir: Path, attention: str | os.PathLike | None) -> list[Path]:
    dirs = [out_dir / ATTENTION_DIR]
    if attention is not None:
        a = Path(attention)
        dirs.insert(0, a / ATTENTION_DIR if (a / ATTENTION_DIR).is_dir() else a)
    return [d for d in dirs if d.is_dir()]


def collect(out_dir: Path, *, attention: str | os.PathLike | None = None,
            manifests: Sequence[os.PathLike] | None = None) -> tuple[list[Row], list[dict]]:
    """One row per slide (its current state), and the run records."""
    from .cohort.manifest import read_manifest

    runs = read_runs(out_dir)
    latest: dict[str, dict] = {}
    last_done: dict[str, dict] = {}
    here = os.path.realpath(out_dir)
    for path in _manifests(out_dir, runs, manifests):
        own = os.path.realpath(path.parent) == here  # this folder's manifest: its rows are this folder's
        try:
            rows = read_manifest(path)
        except (OSError, ValueError) as exc:
            log.warning("%s: manifest not read (%s)", path, exc)
            continue
        for row in rows:
            sid = row.get("slide_id")
            if not sid or (not own and _elsewhere(row.get("store"), out_dir, here)):
                continue  # a manifest shared with other output folders: their slides are theirs
            if row.get("status") == "done":
                last_done[sid] = row
            if row.get("status") == "skipped" and str(row.get("note", "")).startswith("locked") and sid in latest:
                continue  # someone else had it: the earlier row still says its state
            latest[sid] = row
    names = {e.name for e in os.scandir(out_dir)}
    for name in names:  # stores without a manifest row (embedded from Python, an older run)
        if name.endswith(".zarr") and not is_temporary(name) and store_slide_id(name) not in latest:
            sid = store_slide_id(name)
            groups = completed_encoders(out_dir / name)  # not a group still being added, nor a damaged one
            latest[sid] = {"slide_id": sid, "status": "done", "note": "no manifest row", "encoders": ";".join(groups)}
    att: dict[str, str] = {}
    for d in reversed(_attention_dirs(out_dir, attention)):
        for e in os.scandir(d):
            if e.name.endswith(".attention.png"):
                att[e.name[: -len(".attention.png")]] = _href(out_dir, d / e.name)
    out: list[Row] = []
    for sid, row in latest.items():
        done = last_done.get(sid, row)
        error = str(row.get("error") or "")
        encs = [e for e in str(row.get("encoders") or done.get("encoders") or "").split(";") if e]
        r = Row(sid, str(row.get("status")), error, split_fix(error), str(row.get("note") or ""),
                _int(done.get("cells")) if done.get("status") == "done" else None,
                _float(done.get("seconds")) if done.get("status") == "done" else None, encs,
                timestamp=str(row.get("timestamp") or ""))
        if r.status == "done":
            problem = _store_problem(out_dir, f"{sid}.zarr", encs, names)
            if problem:
                r.status, r.error, r.fix = "failed", problem, split_fix(problem)
        elif r.status == "skipped" and r.note.startswith("locked by") and f"{sid}.zarr" not in names \
                and not held_by_a_live_run(out_dir, sid):  # the run it waited for died without a store
            r.status, r.error = "failed", (f"{out_dir / sid}.zarr: not embedded: the run that held it "
                                           f"({r.note[len('locked by '):]}) ended before finishing it; rerun "
                                           "wsi-embed embed on this slide")
            r.fix = split_fix(r.error)
        if r.status == "failed":
            r.cells = r.seconds = None
        if f"{sid}.qc.png" in names:
            r.qc = quote(f"{sid}.qc.png")
        for enc in encs:
            g = group_name(enc)
            if f"{sid}.{g}.map.png" in names:
                r.maps.append((enc, quote(f"{sid}.{g}.map.png")))
            if f"{sid}.{g}.clusters.png" in names:
                r.clusters.append((enc, quote(f"{sid}.{g}.clusters.png")))
        r.attention = att.get(sid)
        out.append(r)
    order = {"failed": 0, "skipped": 2}
    out.sort(key=lambda r: (order.get(r.status, 1), r.slide_id))
    return out, runs


def _elsewhere(store: str | None, out_dir: Path, here: str) -> bool:
    """The row (of a manifest outside ``out_dir``) names a store in another output folder (``here``:
    ``out_dir``'s real path), which still holds it, and this one has none of that name."""
    if not store:
        return False
    path = Path(store)
    return (os.path.realpath(path.parent) != here and path.exists() and not (out_dir / path.name).exists())


def _store_problem(out_dir: Path, store: str, encoders: list[str], names: set[str]) -> str | None:
    """Why a slide the manifest calls done has no usable store, from its metadata alone (chunks are
    left to ``wsi-embed verify``); None when the store says every one of ``encoders`` is complete."""
    path = out_dir / store
    if store not in names:
        return f"{path}: the store is gone since it was embedded; rerun wsi-embed embed on this slide"
    complete = completed_encoders(path)
    lost = [e for e in encoders if e not in complete] if encoders else ([] if complete else ["its encoders"])
    if lost:
        return (f"{path}: the store is damaged ({', '.join(lost)} not complete or unreadable); "
                f"check it with: wsi-embed verify {out_dir} --repair")
    return None


def _href(out_dir: Path, target: Path) -> str:
    return quote(os.path.relpath(target, out_dir))


# -- the page --------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .5em}
.where{color:#666;margin:0 0 1em}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:.2em 1.2em;margin:0}
dl.summary dt{font-weight:600}dl.summary dd{margin:0}
.failures li{margin:.4em 0}.failures code{white-space:pre-wrap;word-break:break-word}
.fix{color:#064;margin-top:.15em}.fix b{color:#064}
.controls{margin:.5em 0;display:flex;gap:.8em;align-items:center;flex-wrap:wrap}
#filter{width:24em;padding:.3em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4;cursor:pointer;user-select:none;position:sticky;top:0;z-index:1}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.err{max-width:28em;word-break:break-word;font-size:.92em}
.st{display:inline-block;padding:0 .5em;border-radius:.6em;font-size:.9em}
.st.done{background:#dfd}.st.skipped{background:#eee}.st.failed{background:#fcc;font-weight:600}
img.thumb{width:150px;height:110px;object-fit:contain;background:#f6f6f6;border:1px solid #ccc;display:block}
.pics{display:flex;gap:.4em;flex-wrap:wrap}.pics figure{margin:0;font-size:.8em;color:#555}
"""

_JS = """
(function(){
  var table=document.getElementById('slides-table'),body=table.tBodies[0];
  var rows=Array.prototype.slice.call(body.rows),text=rows.map(function(r){return r.textContent.toLowerCase();});
  var filter=document.getElementById('filter'),status=document.getElementById('status'),shown=document.getElementById('shown');
  function apply(){
    var q=filter.value.trim().toLowerCase(),s=status.value,n=0;
    rows.forEach(function(r,i){var ok=(!s||r.dataset.status===s)&&(!q||text[i].indexOf(q)>=0);r.hidden=!ok;if(ok)n++;});
    shown.textContent=n+' of '+rows.length+' slides shown';
  }
  function key(r,c,num){var v=r.cells[c].dataset.v;if(num){v=parseFloat(v);return isNaN(v)?-Infinity:v;}return v||'';}
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,c){
    if(!th.dataset.type)return;
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending',num=th.dataset.type==='num';
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(o){o.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var order=rows.map(function(r,i){return i;});
      order.sort(function(a,b){var x=key(rows[a],c,num),y=key(rows[b],c,num);var d=num?x-y:(x<y?-1:x>y?1:0);return (asc?d:-d)||a-b;});
      var frag=document.createDocumentFragment();
      var sorted=order.map(function(i){return rows[i];}),stext=order.map(function(i){return text[i];});
      rows=sorted;text=stext;rows.forEach(function(r){frag.appendChild(r);});body.appendChild(frag);
    });
  });
  filter.addEventListener('input',apply);status.addEventListener('change',apply);apply();
})();
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h ({s:,.0f} s)"
    if s >= 60:
        return f"{s / 60:.1f} min ({s:,.0f} s)"
    return f"{s:.1f} s"


def _summary(rows: list[Row], runs: list[dict]) -> list[tuple[str, str]]:
    counts = {k: sum(r.status == k for r in rows) for k in ("done", "skipped", "failed")}
    locked = sum(r.status == "skipped" and r.note.startswith("locked by") for r in rows)
    patches = sum(r.cells or 0 for r in rows if r.status != "failed")
    elsewhere = f", {locked} being embedded by another run" if locked else ""
    items = [("slides", f"{len(rows)}: {counts['done']} done, {counts['skipped'] - locked} skipped "
                        f"(complete before){elsewhere}, {counts['failed']} failed"),
             ("patches", f"{patches:,} embedded cells")]
    if runs:
        seconds = sum(float(r.get("seconds") or 0) for r in runs)
        cells = sum(int(r.get("cells") or 0) for r in runs)
        rate = f"{cells / seconds:,.1f} patches/s" if seconds and cells else "-"
        items += [("total time", f"{_fmt_seconds(seconds)} over {len(runs)} run(s)"), ("patches/s", rate)]
        machines: dict[str, int] = {}
        for r in runs:
            m = r.get("machine") or {}
            text = (f"{m.get('host', '?')}: {m.get('cpu') or '?'}, {m.get('cores', '?')} cores, "
                    f"{m.get('memory_gb', '?')} GB, GPU {m.get('gpu') or 'none'}")
            machines[text] = machines.get(text, 0) + 1
        items.append(("machine", "; ".join(f"{t} ({n} run{'s' * (n > 1)})" for t, n in machines.items())))
        last = runs[-1]
        items.append(("last run", f"{last.get('finished', '?')}: {last.get('done', 0)} done, "
                                  f"{last.get('skipped', 0)} skipped, {last.get('failed', 0)} failed in "
                                  f"{float(last.get('seconds') or 0):.1f} s"))
    else:
        seconds = sum(r.seconds or 0 for r in rows)
        items += [("total time", f"{_fmt_seconds(seconds)} (sum of the slides' times; no {RUNS_NAME})"),
                  ("patches/s", f"{patches / seconds:,.1f}" if seconds and patches else "-"),
                  ("machine", "unknown (no run record)")]
    return items


def _thumb(href: str, label: str) -> str:
    return (f'<figure><a href="{href}" target="_blank"><img class="thumb" loading="lazy" decoding="async" '
            f'src="{href}" alt="{_e(label)}"></a><figcaption>{_e(label)}</figcaption></figure>')


def _row_html(r: Row) -> str:
    pics = []
    if r.qc:
        pics.append(_thumb(r.qc, "QC"))
    pics += [_thumb(h, f"map {enc}") for enc, h in r.maps]
    pics += [_thumb(h, f"clusters {enc}") for enc, h in r.clusters]
    if r.attention:
        pics.append(_thumb(r.attention, "attention"))
    err = _e(r.error) if r.error else (_e(r.note) if r.note else "")
    cells = "" if r.cells is None else f"{r.cells:,}"
    secs = "" if r.seconds is None else f"{r.seconds:.1f}"
    return (f'<tr data-status="{_e(r.status)}"><td data-v="{_e(r.slide_id)}">{_e(r.slide_id)}</td>'
            f'<td data-v="{_e(r.status)}"><span class="st {_e(r.status)}">{_e(r.status)}</span></td>'
            f'<td class="err" data-v="{_e(r.error or r.note)}">{err}</td>'
            f'<td class="num" data-v="{"" if r.cells is None else r.cells}">{cells}</td>'
            f'<td class="num" data-v="{"" if r.seconds is None else r.seconds}">{secs}</td>'
            f'<td><div class="pics">{"".join(pics)}</div></td>'
            f'<td data-v="{_e(" ".join(r.encoders))}">{"<br>".join(_e(e) for e in r.encoders)}</td></tr>')


def render_report(out_dir: Path, rows: list[Row], runs: list[dict]) -> str:
    failed = [r for r in rows if r.status == "failed"]
    parts = ['<!doctype html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             f"<title>wsi-embed report: {_e(out_dir.name)}</title><style>{_CSS}</style></head><body>",
             "<h1>wsi-embed report</h1>",
             f'<p class="where">{_e(out_dir)} &middot; written {_e(time.strftime("%Y-%m-%d %H:%M:%S %z"))} '
             f"by wsi-embed {_e(__version__)}</p>",
             '<section id="summary"><h2>Summary</h2><dl class="summary">']
    parts += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _summary(rows, runs)]
    parts.append("</dl></section>")
    if failed:
        parts.append(f'<section id="failures" class="failures"><h2>Failures ({len(failed)})</h2><ol>')
        for r in failed:
            fix = f'<div class="fix"><b>fix:</b> {_e(r.fix)}</div>' if r.fix else ""
            parts.append(f"<li><b>{_e(r.slide_id)}</b><br><code>{_e(r.error)}</code>{fix}</li>")
        parts.append("</ol></section>")
    parts += ['<section id="slides"><h2>Slides</h2><div class="controls">',
              '<input id="filter" type="search" placeholder="filter: slide id, error, encoder" aria-label="filter">',
              '<select id="status" aria-label="status"><option value="">every status</option>',
              '<option value="failed">failed</option><option value="done">done</option>',
              '<option value="skipped">skipped</option></select><span id="shown"></span></div>',
              '<table id="slides-table"><thead><tr><th data-type="text">slide</th><th data-type="text">status</th>'
              '<th data-type="text">error or note</th><th data-type="num">cells</th><th data-type="num">seconds</th>'
              "<th>pictures (click for full size)</th><th data-type=\"text\">encoders</th></tr></thead><tbody>"]
    parts += [_row_html(r) for r in rows]
    parts.append(f"</tbody></table></section><script>{_JS}</script></body></html>\n")
    return "".join(parts)


def write_report(out_dir: str | os.PathLike, *, attention: str | os.PathLike | None = None,
                 manifests: Sequence[os.PathLike] | None = None) -> Path:
    """Write ``<out>/report.html`` (atomically) and return its path."""
    out_dir = existing_output_folder(Path(out_dir).absolute(), NotAnOutputFolder)
    if attention is not None and not Path(attention).is_dir():
        raise NotAnOutputFolder(f"--attention {attention}: no such folder; give the folder that "
                                f"workflows/train_abmil.py wrote (holding {ATTENTION_DIR}/)")
    rows, runs = collect(out_dir, attention=attention, manifests=manifests)
    page = render_report(out_dir, rows, runs)
    path = out_dir / REPORT_NAME
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    log.info("%s: %d slides", path, len(rows))
    return path


def rebuild(out_dir: str | os.PathLike, *, maps: bool = False, clusters: int | None = None,
            attention: str | os.PathLike | None = None) -> RunExtras:
    """``wsi-embed report OUT``: optionally redraw every store's maps with one cohort-fitted PCA per
    encoder, then write the page. Bad input raises; a store whose maps fail is a warning."""
    out_dir = existing_output_folder(Path(out_dir).absolute(), NotAnOutputFolder)
    if not (any(p.suffix == ".zarr" for p in out_dir.iterdir()) or read_runs(out_dir)
            or _manifests(out_dir, [], None)):
        raise NotAnOutputFolder(f"{out_dir}: holds no stores, manifest or run record of wsi-embed; "
                                "give the --out folder of wsi-embed embed")
    extras = RunExtras()
    if maps or clusters is not None:
        from .maps import check_clusters, write_maps

        check_clusters(clusters)
        stores = sorted(p for p in out_dir.glob("*.zarr") if not is_temporary(p.name))
        result = write_maps(stores, clusters=clusters, cohort=True)
        extras.maps = result.written
        extras.warnings += result.problems  # the command prints them
    extras.report = write_report(out_dir, attention=attention)
    return extras
