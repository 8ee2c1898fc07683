"""``wsi-embed inspect STORE``: what one store holds, and whether it is consistent.

:func:`inspect_store` returns one dict with the keys ``slide``, ``grid``, ``tissue``, ``encoders``
(a list) and ``consistency``. The consistency check is :func:`wsi_embed.verify.verify_store` (every
chunk read): embeddings finite inside the mask, NaN outside, every group's ``complete`` flag set. A
damaged store is reported as inconsistent, with its problems, never raised.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import IncompleteStore
from .store import (_read_array, _read_group, enclosing_store, group_dirs, is_temporary, refuse_a_temporary_store,
                    refuse_inside_a_store, store_slide_id)
from .verify import GEOMETRY, verify_store

_SLIDE_KEYS = ("slide_id", "path", "vendor", "backend", "dimensions", "mpp", "mpp_source", "objective_power",
               "level_count", "file_size", "fingerprint")
_GRID_KEYS = ("target_mpp", "patch_px", "stride_px", "rows", "cols", "level", "level_mpp", "read_px",
              "cell_size0", "stride0", "origin0")


def _pick(d: dict, keys: tuple[str, ...]) -> dict:
    return {k: d.get(k) for k in keys}


def _encoder(path: Path, key: str) -> dict:
    """One group's summary; what cannot be read is None (the consistency check says why)."""
    row: dict = {"group": key, "name": None, "complete": False, "cells": None, "dim": None, "dtype": None,
                 "weights_random": None, "weights_sha256": None, "weights_source": None, "precision": None,
                 "decoder": None, "architecture": None, "metadata_readable": True}
    try:
        _, attrs = _read_group(path / key)
    except Exception:  # noqa: BLE001 - damaged metadata: reported by the consistency check
        row["metadata_readable"], attrs = False, {}
    enc = attrs.get("encoder", {}) or {}
    row.update(name=enc.get("name"), complete=attrs.get("complete") is True, cells=attrs.get("cells"),
               dim=enc.get("dim"), dtype=enc.get("dtype"), weights_random=enc.get("weights_random"),
               weights_sha256=enc.get("weights_sha256"), weights_source=enc.get("weights_source"),
               precision=enc.get("precision"), decoder=enc.get("decoder"), architecture=enc.get("architecture"))
    try:
        emb = _read_array(path / key / "embeddings")
        row["dim"], row["dtype"] = int(emb.shape[-1]), str(emb.dtype)
    except Exception:  # noqa: BLE001
        pass
    return row


def inspect_store(path: str | os.PathLike) -> dict:
    """Describe a store and check it (reads every chunk). Raises :class:`IncompleteStore` only for a
    path that is not a store at all."""
    path = Path(path)
    refuse_inside_a_store(path, give=f"the store itself: wsi-embed inspect {enclosing_store(path)}")
    refuse_a_temporary_store(path)
    if not path.exists():
        raise IncompleteStore(f"{path}: no such file or directory; give a <slide_id>.zarr folder")
    if not path.is_dir() or (not (path / "zarr.json").exists() and not (path / "mask").is_dir()):
        raise IncompleteStore(f"{path}: not a wsi-embed store (no zarr.json); give a <slide_id>.zarr folder")
    try:
        _, attrs = _read_group(path)
    except Exception:  # noqa: BLE001 - root metadata lost: the consistency check names it
        attrs = {}
    slide, grid, tissue = attrs.get("slide"), attrs.get("grid"), attrs.get("tissue")
    encoders = [_encoder(path, key) for key in group_dirs(path)]
    report = verify_store(path)
    problems = [{"part": p.part, "node": p.node, "what": p.what} for p in report.problems]
    emb_problems = [p for p in report.problems if p.part != GEOMETRY and p.node.endswith("/embeddings")]
    consistency = {
        "ok": report.ok,
        "finite_inside_mask": not any("finite" in p.what or "chunk" in p.what or "missing" in p.what
                                      for p in emb_problems),
        "nan_outside_mask": not any("outside the mask" in p.what for p in emb_problems),
        "complete": bool(encoders) and all(e["complete"] for e in encoders),
        "geometry_ok": not report.geometry_damaged,
        "temporary": is_temporary(path.name),
        "problems": problems,
        "store": str(path),
        "summary": report.summary(),
        "fix": None if report.ok else report.fix(),
    }
    return {
        "slide": None if slide is None else {**_pick(slide, _SLIDE_KEYS), "store": str(path),
                                             "slide_id": slide.get("slide_id") or store_slide_id(path)},
        "grid": None if grid is None else _pick(grid, _GRID_KEYS),
        "tissue": None if tissue is None else {
            "area_mm2": tissue.get("tissue_area_mm2"), "cells_embedded": tissue.get("cells_embedded"),
            "min_tissue": tissue.get("min_tissue"), "method": tissue.get("method"),
            "thumbnail_mpp": tissue.get("thumbnail_mpp")},
        "encoders": encoders,
        "consistency": consistency,
    }


def inspect_lines(info: dict) -> list[str]:
    """The human-readable form of :func:`inspect_store`'s dict."""
    s, g, t, c = info["slide"], info["grid"], info["tissue"], info["consistency"]
    lines = [f"store        {c['store']}"]
    if s:
        w, h = s["dimensions"] or ("?", "?")
        mpp = f"{s['mpp']:.4g}" if isinstance(s["mpp"], (int, float)) else s["mpp"]  # not 0.24649999999999997
        lines += [f"slide        {s['slide_id']}  {s['path']}",
                  f"             {w} x {h} px, vendor {s['vendor'] or '-'}",
                  f"mpp          {mpp} µm/px ({s['mpp_source']})"]
    else:
        lines.append("slide        unreadable (root metadata damaged)")
    if g:
        lines.append(f"grid         {g['cols']} x {g['rows']} cells (across x down) of {g['patch_px']} px "
                     f"at {g['target_mpp']:g} µm/px, "
                     f"stride {g['stride_px']} px, level {g['level']} ({g['level_mpp']:.4g} µm/px)")
    if t:
        lines.append(f"tissue       {t['area_mm2']:.3f} mm², {t['cells_embedded']} cells embedded "
                     f"(min tissue {t['min_tissue']:g})")
    for e in info["encoders"]:
        if not e["metadata_readable"]:
            lines.append(f"encoder      {e['group']}: its metadata cannot be read (embeddings: dim {e['dim']}, "
                         f"{e['dtype']}), INCOMPLETE")
            continue
        weights = "RANDOM" if e["weights_random"] else (f"sha256 {e['weights_sha256']}" if e["weights_sha256"]
                                                        else e["weights_source"] or "?")
        lines.append(f"encoder      {e['name'] or e['group']}: dim {e['dim']}, {e['dtype']}, weights {weights}, "
                     f"precision {e['precision']}, decoder {e['decoder'] or '-'}, "
                     f"{'complete' if e['complete'] else 'INCOMPLETE'}, {e['cells']} cells")
    if not info["encoders"]:
        lines.append("encoder      none")
    flags = (f"finite inside mask {'yes' if c['finite_inside_mask'] else 'NO'}, NaN outside "
             f"{'yes' if c['nan_outside_mask'] else 'NO'}, complete {'yes' if c['complete'] else 'NO'}")
    lines.append(f"consistency  {'ok' if c['ok'] else 'INCONSISTENT'}: {flags}")
    if not c["ok"]:
        lines.append(f"             {c['summary']}")
        lines.append(f"             fix: {c['fix']}")
    return lines
