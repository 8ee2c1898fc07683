"""Pen marks: a slide of real tissue with blue, green, red and black marker strokes over tissue and
glass (``sample_data.ink``), embedded beside its clean twin (in-process, as the CLI's ``embed`` does;
the CLI's own --pen-marks parsing is tested by test_a_bad_pen_marks_value_is_one_line)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from tests.conftest import run_cli
from wsi_embed import EmbedOptions, SlideJob, embed_slides, open_store

ENC = "timm:test_vit"
COVERED = 0.25  # a cell is ink-covered when the drawn ink covers at least a quarter of it


@pytest.fixture(scope="module")
def inked(tmp_path_factory, sample_slide) -> dict:
    from sample_data.ink import make_ink_slide

    root = tmp_path_factory.mktemp("ink")
    made = make_ink_slide(root / "slides")
    out, kept = root / "out", root / "kept"
    from wsi_embed.tissue import TissueParams

    # what `wsi-embed embed inked.tif clean.tif --workers 0 --batch-size 32 [--pen-marks keep]` runs
    opts = EmbedOptions(workers=0, batch_size=32, prepare_processes=0)
    done = list(embed_slides([SlideJob(made["path"], "inked"), SlideJob(made["clean_path"], "clean")], out,
                             [ENC], "random", opts))
    assert [r.status for r in done] == ["done", "done"], [r.error for r in done]
    keep = list(embed_slides([SlideJob(made["path"], "inked")], kept, [ENC], "random",
                             EmbedOptions(workers=0, batch_size=32, prepare_processes=0,
                                          tissue=TissueParams(pen_marks="keep"))))
    assert [r.status for r in keep] == ["done"], [r.error for r in keep]
    return {**made, "out": out, "kept": kept}


def ink_fraction(truth: np.ndarray, coords: np.ndarray, size: float) -> np.ndarray:
    """(rows, cols): the drawn ink's share of each cell's level-0 footprint."""
    h, w = truth.shape
    ii = np.zeros((h + 1, w + 1), np.int64)
    ii[1:, 1:] = truth.cumsum(0).cumsum(1)
    s = int(round(size))
    x0, y0 = coords[..., 0], coords[..., 1]
    x1, y1 = np.minimum(x0 + s, w), np.minimum(y0 + s, h)
    total = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return total / np.maximum((x1 - x0) * (y1 - y0), 1)


def test_ink_cells_are_left_out_and_clean_tissue_kept(inked):
    inked_store, clean_store = open_store(inked["out"] / "inked.zarr"), open_store(inked["out"] / "clean.zarr")
    frac = ink_fraction(inked["ink"], inked_store.coords, inked_store.attrs["grid"]["cell_size0"])
    covered, untouched = frac >= COVERED, frac == 0
    assert covered.sum() >= 50  # the strokes cross many cells, over tissue and glass
    embedded_ink = int((inked_store.mask & covered).sum())
    assert embedded_ink <= 0.05 * covered.sum(), f"{embedded_ink} of {covered.sum()} ink-covered cells embedded"
    clean_tissue = clean_store.mask & untouched
    assert clean_tissue.sum() >= 50
    kept = int((inked_store.mask & clean_tissue).sum())
    assert kept >= 0.9 * clean_tissue.sum(), f"{kept} of {clean_tissue.sum()} clean tissue cells kept"
    # without removal the ink is embedded: the detection is what keeps it out
    kept_store = open_store(inked["kept"] / "inked.zarr")
    assert (kept_store.mask & covered).sum() > 0.3 * covered.sum()
    feats, _ = inked_store.bag(ENC)
    assert len(feats) == inked_store.mask.sum() and np.isfinite(feats).all()


def test_the_store_records_the_ink(inked):
    tissue = open_store(inked["out"] / "inked.zarr").attrs["tissue"]
    assert tissue["pen_marks"] == "remove"
    truth_mm2 = inked["ink"].sum() * 0.5 * 0.5 / 1e6
    assert 0.8 * truth_mm2 < tissue["ink_area_mm2"] < 1.4 * truth_mm2  # the margin adds a little
    assert all(tissue["ink_mm2"][c] > 0.05 for c in inked["colours"]), tissue["ink_mm2"]
    # every tissue cell the ink cost is counted: over 10% ink, or under --min-tissue once the ink left the mask
    with_ink, without = open_store(inked["kept"] / "inked.zarr").mask, open_store(inked["out"] / "inked.zarr").mask
    assert tissue["cells_excluded"]["ink"] == int(with_ink.sum() - without.sum()) > 0
    root = zarr.open_group(str(inked["out"] / "inked.zarr"), mode="r")
    assert root["ink_mask"].shape == root["tissue_mask"].shape and root["ink_mask"].dtype == bool
    assert not (root["ink_mask"][...] & root["tissue_mask"][...]).any()  # removed from the tissue
    assert root["ink_fraction"].shape == root["mask"].shape
    clean = open_store(inked["out"] / "clean.zarr").attrs["tissue"]
    assert clean["ink_area_mm2"] == 0.0 and clean["cells_excluded"]["ink"] == 0
    kept = open_store(inked["kept"] / "inked.zarr").attrs["tissue"]
    assert kept["pen_marks"] == "keep" and kept["ink_area_mm2"] == pytest.approx(tissue["ink_area_mm2"])
    assert "ink" not in kept["cells_excluded"]
    checked = run_cli("verify", str(inked["out"]))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_no_ink_is_found_on_real_he(sample_slide):
    from wsi_embed.pen import detect_ink
    from wsi_embed.slide import open_slide, resolve_mpp
    from wsi_embed.tissue import TissueParams, read_thumbnail

    with open_slide(sample_slide) as slide:
        thumb = read_thumbnail(slide, resolve_mpp(slide, None).mpp, TissueParams())
    ink, counts = detect_ink(thumb.image, thumb.mpp_x)
    assert not ink.any(), counts


def _orange(path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 180) & (g > 80) & (g < 190) & (b < 90) & (r - b > 120)).sum())


def test_the_qc_picture_draws_ink_in_its_own_colour(inked):
    assert _orange(inked["out"] / "inked.qc.png") > 5000
    assert _orange(inked["out"] / "clean.qc.png") < 50


def test_a_bad_pen_marks_value_is_one_line(inked, tmp_path):
    bad = run_cli("embed", str(inked["clean_path"]), "--out", str(tmp_path / "o"), "--model", ENC,
                  "--weights", "random", "--pen-marks", "erase")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--pen-marks must be one of remove, keep" in bad.stderr


def test_the_qc_caption_says_whether_the_ink_was_removed_or_kept(inked, tmp_path, monkeypatch):
    import json
    import shutil

    from wsi_embed import qc

    captions = []
    monkeypatch.setattr(qc, "_with_caption", lambda picture, title: captions.append(title) or picture)
    store = tmp_path / "inked.zarr"
    shutil.copytree(inked["out"] / "inked.zarr", store)
    qc.render_store_qc(store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["tissue"]["pen_marks"] = "keep"
    (store / "zarr.json").write_text(json.dumps(meta))
    qc.render_store_qc(store)
    assert "pen ink (orange, removed)" in captions[0] and "pen ink (orange, kept)" in captions[1], captions
