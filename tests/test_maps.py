"""Embedding maps on the planted-signal cohort, and the QC picture on large and small slides."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sample_data.synthetic import PLANTED_BOX
from tests.conftest import run_cli

ENC = "timm:test_vit"


def _regions(store):
    """Embedded cells wholly inside the planted box, and those wholly outside it."""
    c, cs, m = store.coords, store.attrs["grid"]["cell_size0"], store.mask
    x0, y0, x1, y1 = PLANTED_BOX
    inside = (c[..., 0] >= x0) & (c[..., 1] >= y0) & (c[..., 0] + cs <= x1) & (c[..., 1] + cs <= y1)
    touch = (c[..., 0] + cs > x0) & (c[..., 1] + cs > y0) & (c[..., 0] < x1) & (c[..., 1] < y1)
    return m & inside, m & ~touch


@pytest.fixture(scope="module")
def stores(planted_cohort):
    from wsi_embed import open_store

    return [(row, open_store(planted_cohort["out"] / f"{row['slide_id']}.zarr")) for row in planted_cohort["slides"]]


def test_embed_writes_maps_report_and_run_record(planted_cohort):
    # the planted cohort's run: run_cohort then finish_run, as the CLI's embed runs them (that the CLI
    # calls them: test_embed.py::test_sample_slide_end_to_end_cli and test_maps_off)
    out = planted_cohort["out"]
    for row in planted_cohort["slides"]:
        path = out / f"{row['slide_id']}.timm-test_vit.map.png"
        assert path.is_file(), path
        assert Image.open(path).size[0] >= 1024
    assert not list(out.glob(".*.tmp-*"))  # atomic writes leave no temporaries
    assert (out / "report.html").is_file()
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert runs[-1]["done"] == 8 and runs[-1]["cells"] > 0 and runs[-1]["machine"]["cores"] >= 1


def test_planted_region_takes_its_own_colour(stores):
    """Cohort-fitted PCA colours: the planted box's cells are far from the rest in RGB, further
    than the same box on the slides without the planted signal (measured: planted 124-168, the
    controls 40-89, on 0-255 RGB)."""
    from wsi_embed.maps import cell_values, fit_cohort

    projection = fit_cohort([s for _, s in stores], ENC)
    planted, control = [], []
    for row, store in stores:
        rgb, _ = cell_values(store, projection)
        inside, outside = _regions(store)
        assert inside.sum() >= 4 and outside.sum() >= 20
        d = float(np.linalg.norm(rgb[inside].mean(0).astype(float) - rgb[outside].mean(0)))
        (planted if row["label"] else control).append(d)
    assert min(planted) >= 100, planted
    assert min(planted) > max(control), (planted, control)


def test_the_png_shows_it(stores, planted_cohort):
    """The map as written: pixels at the centres of planted cells against the others."""
    from wsi_embed.maps import fit_cohort, render_maps

    projection = fit_cohort([s for _, s in stores], ENC)
    row, store = next((r, s) for r, s in stores if r["label"])
    pca, _ = render_maps(store, projection)
    png = np.asarray(pca.image).astype(float)
    inside, outside = _regions(store)
    centre = store.coords + store.attrs["grid"]["cell_size0"] / 2
    px = (centre[..., 0] * pca.scale[0]).astype(int)
    py = (centre[..., 1] * pca.scale[1]).astype(int) + pca.top
    a, b = png[py[inside], px[inside]].mean(0), png[py[outside], px[outside]].mean(0)
    assert np.linalg.norm(a - b) >= 80, (a, b)
    # and the cell colours are what was painted (alpha blend over a light grey)
    assert np.abs(png[py[inside], px[inside]] - pca.colours[inside]).mean() < 40


def test_projection_is_deterministic_and_sign_fixed(stores):
    from wsi_embed.maps import fit_projection, sample_cells

    feats = sample_cells(stores[1][1], ENC, 10_000)
    a = fit_projection(feats, encoder=ENC)
    b = fit_projection(feats[::-1].copy(), encoder=ENC)  # same cells, another order
    assert np.allclose(a.components, b.components, atol=1e-4)
    big = np.abs(a.components).argmax(1)
    assert (a.components[np.arange(3), big] > 0).all()
    assert np.array_equal(a.colours(feats), b.colours(feats))


def test_clusters_and_per_slide_maps_from_the_cli(planted_cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(planted_cohort["out"], out)
    done = run_cli("report", str(out), "--maps", "--clusters", "3")
    assert done.returncode == 0, done.stderr
    assert "maps: 16 written" in done.stdout
    from wsi_embed import open_store
    from wsi_embed.maps import fit_cohort, render_maps

    stores = [open_store(p) for p in sorted(out.glob("*.zarr"))]
    _, clustered = render_maps(stores[1], fit_cohort(stores, ENC, clusters=3))
    labels = clustered.labels[clustered.mask]
    assert set(np.unique(labels)) <= {0, 1, 2} and len(np.unique(labels)) >= 2
    assert (clustered.labels[~clustered.mask] == -1).all()
    for p in sorted(out.glob("*.zarr")):
        assert (out / f"{p.stem}.timm-test_vit.clusters.png").is_file()
    # inspect --maps: one slide, fitted on itself
    one = out / "planted_003.zarr"
    (out / "planted_003.timm-test_vit.map.png").unlink()
    done = run_cli("inspect", str(one), "--maps")
    assert done.returncode == 0, done.stderr
    assert (out / "planted_003.timm-test_vit.map.png").is_file()
    (out / "planted_003.timm-test_vit.map.png").unlink()
    (out / "planted_003.timm-test_vit.clusters.png").unlink()
    done = run_cli("inspect", str(one), "--clusters", "3")  # asks for the maps too, as report does
    assert done.returncode == 0, done.stderr
    assert (out / "planted_003.timm-test_vit.map.png").is_file()
    assert (out / "planted_003.timm-test_vit.clusters.png").is_file()
    bad = run_cli("report", str(out), "--clusters", "1")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_maps_off(planted_cohort, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(planted_cohort["slides"][0]["path"], slides)
    out = tmp_path / "out"
    done = run_cli("embed", str(slides), "--out", str(out), "--model", ENC, "--weights", "random",
                   "--workers", "0", "--no-maps")
    assert done.returncode == 0, done.stderr
    assert not list(out.glob("*.map.png"))
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in done.stdout


def test_qc_cells_and_contour_stay_visible(stores):
    """Cells smaller than a picture pixel (a very large slide) are still tinted, without hiding the
    tissue under a solid colour."""
    from wsi_embed.grid import Grid
    from wsi_embed.qc import render_qc

    store = stores[0][1]
    attrs = store.attrs
    grid = Grid.from_attrs(attrs["grid"])
    fine = dataclasses.replace(grid, read_px=2, stride_level_px=2.0, rows=1024, cols=1536)
    coords = fine.coords()
    thumb, tissue = store._geometry("thumbnail")[...], store._geometry("tissue_mask")[...]
    sx, sy = attrs["tissue"]["thumbnail_scale"]
    ty = np.clip((coords[..., 1] * sy).astype(int), 0, tissue.shape[0] - 1)
    tx = np.clip((coords[..., 0] * sx).astype(int), 0, tissue.shape[1] - 1)
    embedded = tissue[ty, tx]
    with_cells = np.asarray(render_qc(thumb, tissue, fine, coords, embedded, scale_x=sx, scale_y=sy, title="t"), int)
    without = np.asarray(render_qc(thumb, tissue, fine, coords, np.zeros_like(embedded), scale_x=sx, scale_y=sy,
                                   title="t"), int)
    blue = (with_cells[..., 2] - with_cells[..., 0]) - (without[..., 2] - without[..., 0]) > 10
    assert blue.mean() >= 0.8 * embedded.mean()
    lum_a, lum_b = with_cells[blue].mean(1), without[blue].mean(1)
    assert np.corrcoef(lum_a, lum_b)[0, 1] > 0.5  # the tissue still shows through the tint
    # the tissue contour is drawn at least 2 px wide on this small slide
    green = (with_cells[..., 1] > 180) & (with_cells[..., 0] < 40) & (with_cells[..., 2] < 40)
    assert green.sum() > 2 * (with_cells.shape[0] + with_cells.shape[1])


def test_a_rerun_draws_the_map_a_complete_store_lacks(planted_cohort, tmp_path):
    """A slide completed just before an interrupt has a store but no map: the rerun skips the slide
    and draws its map, fitted on the same slides as the first run, so it is the picture that run
    would have drawn and the maps that exist stay the same pictures."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for row in planted_cohort["slides"][:2]:
        shutil.copy(row["path"], slides)
    out = tmp_path / "out"
    args = ("embed", str(slides), "--out", str(out), "--model", ENC, "--weights", "random", "--workers", "0")
    assert run_cli(*args).returncode == 0
    lost, kept = (out / f"{row['slide_id']}.timm-test_vit.map.png" for row in planted_cohort["slides"][:2])
    drawn = np.asarray(Image.open(lost))
    lost.unlink()
    before = np.asarray(Image.open(kept))
    again = run_cli(*args)
    assert again.returncode == 0 and "2 skipped" in again.stdout, again.stdout
    assert lost.is_file() and Image.open(lost).size[0] >= 1024
    assert np.array_equal(np.asarray(Image.open(lost)), drawn)
    assert np.array_equal(np.asarray(Image.open(kept)), before)


def test_fewer_cells_than_clusters_is_said(sample_slide, tmp_path):
    """--clusters 3 on a store of one cell drew one cluster, and a store without cells none, silently."""
    from wsi_embed import EmbedOptions, embed_slide
    from wsi_embed.maps import write_maps

    one = embed_slide(sample_slide, tmp_path / "one", ["timm:test_vit"], "random",
                      EmbedOptions(workers=0, max_patches=1, qc=False))
    result = write_maps([one.store], clusters=3, cohort=False)
    assert any("only 1 of 3 clusters drawn: the fit had 1 cell(s)" in p for p in result.problems), result.problems
