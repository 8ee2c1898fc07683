"""Per-cell artefact measures and ``--drop-blank`` / ``--drop-blurry``, on a slide of real tissue
with a planted blank (uniform stain) area and a planted out-of-focus (blurred) area."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import run_cli
from wsi_embed import EmbedOptions, open_store
from wsi_embed.artefacts import BLANK_THRESHOLD, BLUR_THRESHOLD, patch_measures
from wsi_embed.cohort import plan_cohort, run_cohort

ENC, OTHER = "timm:test_vit", "timm:test_resnet"
# in-process, as `wsi-embed embed SLIDE --out OUT --workers 0 --batch-size 32 [--drop-blank|--drop-blurry]`
# runs it (run_cohort also writes the manifest); the CLI's flags: test_resume_repair_and_a_second_encoder...
# (--drop-blurry) and test_resume.py (--drop-blank)
RUN = dict(workers=0, batch_size=32, prepare_processes=0)
CELL = 224
BLANK = (1, 4, 1, 4)  # rows r0..r1-1, cols c0..c1-1 of the planted areas (whole cells)
BLURRED = (4, 8, 8, 12)


def _box(r0, r1, c0, c1, shape) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.fixture(scope="module")
def slide(tmp_path_factory, sample_slide) -> Path:
    from scipy import ndimage

    from sample_data.ink import _write
    from sample_data.synthetic import sample_rgb

    rgb = sample_rgb(3072, 2048, origin=(600, 700), seed=5)
    r0, r1, c0, c1 = BLANK
    rgb[r0 * CELL : r1 * CELL, c0 * CELL : c1 * CELL] = (215, 160, 200)  # a stain pool: tissue colour, no detail
    r0, r1, c0, c1 = BLURRED
    area = rgb[r0 * CELL : r1 * CELL, c0 * CELL : c1 * CELL].astype(np.float32)
    rgb[r0 * CELL : r1 * CELL, c0 * CELL : c1 * CELL] = np.rint(ndimage.gaussian_filter(area, (4, 4, 0)))
    return _write(tmp_path_factory.mktemp("artefacts") / "planted.tif", rgb, 0.5)


@pytest.fixture(scope="module")
def runs(slide, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, flags in (("none", {}), ("blank", {"drop_blank": True}), ("blurry", {"drop_blurry": True})):
        done = run_cohort(plan_cohort([slide]), root / name, [ENC], "random", EmbedOptions(**RUN, **flags))
        assert done.ok and done.done == 1, [r.error for r in done.results]
        out[name] = root / name / "planted.zarr"
    return out


def _arrays(store: Path) -> dict:
    root = zarr.open_group(str(store), mode="r")
    return {k: root[k][...] for k in ("mask", "grey_std", "laplacian_var", "tissue_fraction")}


def test_patch_measures():
    flat = torch.full((2, 32, 32, 3), 200, dtype=torch.uint8)
    noisy = torch.randint(0, 256, (1, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    m = patch_measures(torch.cat([flat, noisy]))
    assert m.shape == (3, 2) and m.dtype == torch.float32
    assert m[0].tolist() == [0.0, 0.0] and m[2, 0] > 30 and m[2, 1] > 1000


def test_measures_are_stored_beside_tissue_fraction(runs):
    a = _arrays(runs["none"])
    shape = a["mask"].shape
    for name in ("grey_std", "laplacian_var"):
        assert a[name].dtype == np.float32 and a[name].shape == shape
        assert np.isnan(a[name][~a["mask"]]).all() and np.isfinite(a[name][a["mask"]]).all()
    blank = a["mask"] & _box(*BLANK, shape)
    blurred = a["mask"] & _box(*BLURRED, shape)
    clean = a["mask"] & ~_box(*BLANK, shape) & ~_box(*BLURRED, shape)
    assert blank.sum() == 9 and blurred.sum() >= 6 and clean.sum() >= 30
    assert (a["grey_std"][blank] < BLANK_THRESHOLD).all()
    assert (a["grey_std"][blurred] >= BLANK_THRESHOLD).all() and (a["laplacian_var"][blurred] < BLUR_THRESHOLD).all()
    assert (a["laplacian_var"][clean] >= BLUR_THRESHOLD).mean() >= 0.95
    assert (a["grey_std"][clean] >= BLANK_THRESHOLD).mean() >= 0.95
    tissue = open_store(runs["none"]).attrs["tissue"]
    assert tissue["artefacts"]["drop_blank"] is False and "blank" not in tissue["cells_excluded"]


@pytest.mark.parametrize("kind", ["blank", "blurry"])
def test_dropped_cells_leave_the_mask_and_the_counts_follow(runs, kind):
    base, dropped = _arrays(runs["none"]), _arrays(runs[kind])
    shape = base["mask"].shape
    for name in ("grey_std", "laplacian_var"):  # measured on the same pixels either way
        np.testing.assert_allclose(dropped[name], base[name], rtol=1e-5, equal_nan=True)
    measure, threshold = ("grey_std", BLANK_THRESHOLD) if kind == "blank" else ("laplacian_var", BLUR_THRESHOLD)
    gone = base["mask"] & (base[measure] < threshold)
    assert np.array_equal(dropped["mask"], base["mask"] & ~gone)
    assert (gone & _box(*BLANK, shape)).sum() == 9  # a uniform area is blank, and blurry too
    blurred = base["mask"] & _box(*BLURRED, shape)
    assert (gone & blurred).sum() == (blurred.sum() if kind == "blurry" else 0)
    store = open_store(runs[kind])
    tissue = store.attrs["tissue"]
    assert tissue["cells_excluded"][kind] == int(gone.sum())
    assert tissue["cells_embedded"] == int(dropped["mask"].sum())
    assert tissue["artefacts"][f"drop_{kind}"] is True
    emb = store.embeddings(ENC)[...]
    assert np.isnan(emb[gone]).all() and np.isfinite(emb[dropped["mask"]]).all()
    feats, _ = store.bag(ENC)
    assert len(feats) == dropped["mask"].sum()
    manifest = next(csv.DictReader((runs[kind].parent / "manifest.csv").open()))
    assert int(manifest["cells"]) == int(dropped["mask"].sum())
    checked = run_cli("verify", str(runs[kind]))
    assert checked.returncode == 0, checked.stdout


def test_resume_repair_and_a_second_encoder_keep_the_drops(runs, slide):
    store = runs["blurry"]
    before = _arrays(store)["mask"]
    # the CLI once: its --drop-blurry must match the store's options, or this would be a conflict
    again = run_cli("embed", str(slide), "--out", str(store.parent), "--drop-blurry", "--model", ENC,
                    "--weights", "random", "--workers", "0", "--batch-size", "32")
    assert again.returncode == 0 and "skipped" in again.stdout
    chunk = sorted(p for p in (store / "mask" / "c").rglob("*") if p.is_file())[-1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert run_cli("verify", str(store)).returncode != 0
    # in-process `wsi-embed verify --repair --workers 0` (the CLI's --repair: test_verify.py)
    from wsi_embed.verify import repair_store

    repaired = repair_store(store, EmbedOptions(workers=0))
    assert repaired.ok, repaired.line()
    assert np.array_equal(_arrays(store)["mask"], before)
    assert open_store(store).attrs["tissue"]["artefacts"]["drop_blurry"] is True
    added = run_cohort(plan_cohort([slide]), store.parent, [OTHER], "random",
                       EmbedOptions(workers=0, prepare_processes=0, drop_blurry=True))
    assert added.ok and added.done == 1, [r.error for r in added.results]
    assert np.array_equal(_arrays(store)["mask"], before)
    assert set(open_store(store).encoders) == {ENC, OTHER}
    assert run_cli("verify", str(store)).returncode == 0


def test_measures_in_chunks_equal_the_whole_region(sample_slide):
    """On a CPU a region is measured a few patches at a time; the figures are those of one pass."""
    import openslide

    from wsi_embed import artefacts

    with openslide.OpenSlide(str(sample_slide)) as s:
        pixels = np.asarray(s.read_region((0, 0), 0, (448 * 4, 448 * 2)).convert("RGB"))
    patches = torch.from_numpy(np.ascontiguousarray(
        pixels.reshape(2, 448, 4, 448, 3).transpose(0, 2, 1, 3, 4).reshape(8, 448, 448, 3)))
    assert artefacts.CPU_CHUNK_PIXELS // (448 * 448) < 8  # several chunks
    whole = artefacts._measures(patches)
    assert torch.allclose(artefacts.patch_measures(patches), whole, rtol=1e-5)
    assert float(whole[:, 0].min()) > 0  # real pixels, not a constant


def test_a_slide_whose_every_cell_is_dropped_is_a_sound_empty_store(slide, tmp_path):
    """An all-False mask is written as a chunk like any other: zarr would drop an all-empty chunk
    unless told not to, and a missing geometry chunk is how damage shows."""
    from wsi_embed.verify import verify_store

    opts = EmbedOptions(**RUN, drop_blank=True, blank_threshold=1e9)
    done = run_cohort(plan_cohort([slide]), tmp_path, [ENC], "random", opts)
    assert done.ok and done.done == 1, [r.error for r in done.results]
    store = tmp_path / "planted.zarr"
    report = verify_store(store)
    assert report.ok, report.error_line()
    opened = open_store(store)
    assert not opened.mask.any() and opened.bag(ENC)[0].shape == (0, 64)
    assert opened.attrs["tissue"]["cells_embedded"] == 0
