"""User tissue masks and GeoJSON annotations: exact cells for an annotation with a hole, class
filters and labels, masks at any scale, ``--list`` columns, and one clear error per bad file (that
slide fails alone). The CLI runs where its flags are what is tested (--annotations with
--annotation-classes, --tissue-mask, the up-front refusal); the rest runs in-process, as the CLI's
``embed`` does (``plan_cohort`` then ``run_cohort``), without a new interpreter each time."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from tests.conftest import run_cli
from wsi_embed import EmbedOptions, open_store
from wsi_embed.cohort import parse_shard, plan_cohort, run_cohort
from wsi_embed.errors import InvalidOption

ENC = "timm:test_vit"
RUN = ("--model", ENC, "--weights", "random", "--workers", "0", "--batch-size", "32")


def embed(inputs=(), out=None, list_file=None, **options):
    """In-process `wsi-embed embed INPUTS|--list FILE --out OUT *RUN [options]`: its summary."""
    opts = EmbedOptions(workers=0, batch_size=32, prepare_processes=0, **options)
    jobs = plan_cohort([str(i) for i in inputs], list_file, out_dir=out, options=opts)
    return run_cohort(jobs, out, [ENC], "random", opts)


@pytest.fixture(scope="module")
def slide(tmp_path_factory, sample_slide) -> Path:
    """3072 x 2048 px of real tissue and glass at 0.5 µm/px: 9 x 13 cells."""
    from sample_data.ink import _write
    from sample_data.synthetic import sample_rgb

    root = tmp_path_factory.mktemp("masks")
    return _write(root / "slides" / "base.tif", sample_rgb(3072, 2048, origin=(600, 700), seed=3), 0.5)


@pytest.fixture(scope="module")
def baseline(slide, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    done = embed([slide], out)
    assert done.exit_code == 0 and done.done == 1, [r.error for r in done.results]
    return out / "base.zarr"


def cell_box(store, r0: int, r1: int, c0: int, c1: int) -> list[list[float]]:
    """A closed ring on the cell edges around rows r0..r1-1, cols c0..c1-1 (level-0 px)."""
    coords, size = store.coords, store.attrs["grid"]["cell_size0"]
    x0, y0 = float(coords[r0, c0, 0]), float(coords[r0, c0, 1])
    x1, y1 = float(coords[r1 - 1, c1 - 1, 0] + size), float(coords[r1 - 1, c1 - 1, 1] + size)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def cells(shape, r0, r1, c0, c1) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def qupath_geojson(store) -> dict:
    """A QuPath 0.4-style export: a tumour outline with a hole, a stroma region (older string
    classification, as a MultiPolygon), a point and a detection (both ignored)."""
    outer, hole = cell_box(store, 1, 7, 2, 10), cell_box(store, 3, 5, 4, 7)
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a1", "geometry": {"type": "Polygon", "coordinates": [outer, hole[::-1]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[cell_box(store, 7, 9, 0, 4)]]},
         "properties": {"objectType": "annotation", "classification": "Stroma"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [100.0, 100.0]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [cell_box(store, 0, 9, 0, 13)]},
         "properties": {"objectType": "detection", "classification": {"name": "Tumor"}}},
    ]}


def test_an_annotation_with_a_hole_gives_exactly_its_cells(slide, baseline, tmp_path):
    base = open_store(baseline)
    shape = base.mask.shape
    ring = cells(shape, 1, 7, 2, 10) & ~cells(shape, 3, 5, 4, 7)
    stroma = cells(shape, 7, 9, 0, 4)
    assert (base.mask & ring).sum() >= 20 and (base.mask & ~ring).sum() >= 20
    geojson = tmp_path / "base.geojson"
    geojson.write_text(json.dumps(qupath_geojson(base)))

    out = tmp_path / "tumour"
    done = run_cli("embed", str(slide), "--out", str(out), "--annotations", str(geojson),
                   "--annotation-classes", "tumor", *RUN)
    assert done.returncode == 0, done.stderr
    store = open_store(out / "base.zarr")
    assert np.array_equal(store.mask, base.mask & ring)
    labels = zarr.open_group(str(out / "base.zarr"), mode="r")["annotation"][...]
    assert labels.dtype == np.int16 and np.array_equal(labels, np.where(ring, 0, -1))
    tissue = store.attrs["tissue"]
    assert tissue["annotations"]["classes"] == ["Tumor"] and tissue["annotations"]["kept_classes"] == ["tumor"]
    assert tissue["cells_excluded"]["annotation"] == int((base.mask & ~ring).sum())
    feats, _ = store.bag(ENC)
    assert len(feats) == store.mask.sum() and np.isfinite(feats).all()

    out2 = tmp_path / "all"
    done = embed([slide], out2, annotations=str(geojson))
    assert done.exit_code == 0 and done.done == 1, [r.error for r in done.results]
    both = open_store(out2 / "base.zarr")
    assert np.array_equal(both.mask, base.mask & (ring | stroma))
    labels = zarr.open_group(str(out2 / "base.zarr"), mode="r")["annotation"][...]
    assert np.array_equal(labels, np.where(ring, 0, np.where(stroma, 1, -1)))
    assert both.attrs["tissue"]["annotations"]["classes"] == ["Tumor", "Stroma"]
    checked = run_cli("verify", str(out2))
    assert checked.returncode == 0, checked.stdout


def test_a_mask_at_another_scale_gives_the_same_cells(slide, baseline, tmp_path):
    base = open_store(baseline)
    tmask = zarr.open_group(str(baseline), mode="r")["tissue_mask"][...]
    user = tmask.copy()
    h, w = user.shape
    user[:, : w // 3] = False  # a user who wants the right two thirds only
    yy, xx = np.mgrid[:h, :w]
    user[(yy - h // 2) ** 2 + (xx - 2 * w // 3) ** 2 < (h // 5) ** 2] = False  # and no round hole
    slides, masks = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir()
    masks.mkdir()
    for sid in ("thumbscale", "bigger"):
        shutil.copy(slide, slides / f"{sid}.tif")
    Image.fromarray(user.astype(np.uint8) * 255).save(masks / "thumbscale.png")
    big = np.repeat(np.repeat(user, 3, axis=0), 3, axis=1)
    import tifffile

    tifffile.imwrite(masks / "bigger.tiff", big.astype(np.uint8))  # 0/1, another format
    listing = tmp_path / "slides.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "tissue_mask"])
        writer.writerow(["slides/thumbscale.tif", "masks/thumbscale.png"])  # relative to the list
        writer.writerow(["slides/bigger.tif", str(masks / "bigger.tiff")])
    out = tmp_path / "out"
    done = embed(out=out, list_file=listing)
    assert done.exit_code == 0 and done.done == 2, [r.error for r in done.results]
    a, b = open_store(out / "thumbscale.zarr"), open_store(out / "bigger.zarr")
    assert np.array_equal(a.mask, b.mask)
    assert a.attrs["tissue"]["method"] == "user mask" and a.attrs["tissue"]["mask_path"].endswith("thumbscale.png")
    assert b.attrs["tissue"]["mask_path"].endswith("bigger.tiff")
    assert a.mask.sum() >= 10 and not a.mask[:, : a.mask.shape[1] // 3 - 1].any()
    assert a.mask.sum() < base.mask.sum()
    assert np.array_equal(zarr.open_group(str(out / "bigger.zarr"), mode="r")["tissue_mask"][...], user)


def _write_list(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "slide_id", "tissue_mask", "annotations"])
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def test_each_bad_mask_or_annotation_fails_its_slide_alone_in_one_line(slide, baseline, tmp_path, caplog):
    base = open_store(baseline)
    files = tmp_path / "files"
    files.mkdir()
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(files / "square.png")  # the slide is 3:2
    (files / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (files / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    empty = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[5, 5], [5, 5], [5, 5], [5, 5]]]},
             "properties": {"classification": {"name": "Tumor"}}}
    (files / "empty.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [empty]}))
    far = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[100, 100], [30000, 100], [30000, 900], [100, 900], [100, 100]]]}, "properties": {}}
    (files / "outside.geojson").write_text(json.dumps(far))
    (files / "nothumour.geojson").write_text(json.dumps(qupath_geojson(base)))
    cases = {  # slide id -> (mask, annotations, what the error says)
        "ratio": (files / "square.png", "", "aspect ratios differ"),
        "unreadable_mask": (files / "garbage.png", "", "cannot read the tissue mask"),
        "missing_mask": (files / "nothere.png", "", "tissue mask of slide missing_mask not found"),
        "unreadable_geojson": ("", files / "broken.geojson", "cannot read the annotations"),
        "empty_polygon": ("", files / "empty.geojson", "empty polygon"),
        "outside": ("", files / "outside.geojson", "outside the slide"),
    }
    copies = tmp_path / "slides"
    copies.mkdir()
    for sid in [*cases, "good"]:  # one file each: a cohort lists a file once
        shutil.copy(slide, copies / f"{sid}.tif")
    rows = [{"path": str(copies / f"{sid}.tif"), "slide_id": sid, "tissue_mask": m, "annotations": a}
            for sid, (m, a, _) in cases.items()]
    rows.append({"path": str(copies / "good.tif"), "slide_id": "good", "tissue_mask": "", "annotations": ""})
    listing = tmp_path / "slides.csv"
    _write_list(listing, rows)
    out = tmp_path / "out"
    # in-process (the CLI prints each failed result's error as one `error:` line: test_cohort.py's
    # test_cohort_with_a_bad_slide_and_same_names; its --list: test_store_rules.py)
    done = embed(out=out, list_file=listing)
    assert done.exit_code == 1 and not any(r.exc_info for r in caplog.records), "no traceback for a bad file"
    assert (out / "good.zarr").is_dir()
    results = {r.slide_id: r for r in done.results}
    manifest = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    for sid, (mask, ann, says) in cases.items():
        error = manifest[sid]["error"]
        assert manifest[sid]["status"] == "failed" and says in error, (sid, error)
        assert str(mask or ann) in error and "\n" not in error, error
        assert results[sid].status == "failed" and results[sid].error == error
        assert not (out / f"{sid}.zarr").exists()
    assert manifest["good"]["status"] == "done"


def test_a_folder_without_the_slides_mask_fails_that_slide(slide, baseline, tmp_path):
    slides, masks = tmp_path / "slides", tmp_path / "masks"
    slides.mkdir()
    masks.mkdir()
    for sid in ("has", "lacks"):
        shutil.copy(slide, slides / f"{sid}.tif")
    tmask = zarr.open_group(str(baseline), mode="r")["tissue_mask"][...]
    Image.fromarray(tmask.astype(np.uint8) * 255).save(masks / "has.png")
    out = tmp_path / "out"
    done = run_cli("embed", str(slides), "--out", str(out), "--tissue-mask", str(masks), *RUN)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert np.array_equal(open_store(out / "has.zarr").mask, open_store(baseline).mask)
    manifest = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert manifest["lacks"]["status"] == "failed"
    assert f"{masks}: no tissue mask for slide lacks" in manifest["lacks"]["error"]


def test_one_annotation_file_for_several_slides_is_refused(slide, tmp_path):
    """One slide's annotation must not be applied to every slide of a cohort."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in ("a", "b"):
        shutil.copy(slide, slides / f"{sid}.tif")
    one = tmp_path / "a.geojson"
    one.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[100, 100], [1000, 100], [1000, 900], [100, 100]]]}}))
    out = tmp_path / "out"
    done = run_cli("embed", str(slides), "--out", str(out), "--annotations", str(one), *RUN)
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode == 1 and str(one) in line and "2 slides" in line and "folder" in line
    assert not list(out.glob("*.zarr")) if out.exists() else True
    # a shard of one slide must not hide it: the cohort is checked before it is sharded (in-process:
    # what the CLI's `--shard 0/2` plans)
    with pytest.raises(InvalidOption, match="2 slides would use it"):
        plan_cohort([slides], shard=parse_shard("0/2"), out_dir=out,
                    options=EmbedOptions(workers=0, annotations=str(one)))


def test_class_names_of_other_exporters():
    from wsi_embed.masks import class_name

    assert class_name({"classification": {"name": "Tumor", "colorRGB": -65536}}) == "Tumor"  # QuPath 0.2
    assert class_name({"classification": "Stroma"}) == "Stroma"
    assert class_name({"name": "Necrosis"}) == "Necrosis"
    assert class_name({"objectType": "annotation"}) is None
