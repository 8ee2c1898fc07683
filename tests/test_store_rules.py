"""Rules that keep stores trustworthy: groups are only added to the same slide's store, --overwrite
replaces only what it recomputes, provenance is complete, reads agree at inexact downsamples."""

from __future__ import annotations

import shutil

import numpy as np
import openslide
import pytest

from wsi_embed import EmbedOptions, embed_slide, open_store
from wsi_embed.grid import GridSpec, plan_grid
from wsi_embed.slide import open_slide, resolve_mpp

FAST = EmbedOptions(workers=0, max_patches=6)


def test_a_group_is_never_added_to_another_slides_store(sample_slide, painted_slide, tmp_path):
    first = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random", FAST, slide_id="001")
    assert first.status == "done"
    other = embed_slide(painted_slide[0], tmp_path, ["timm:test_resnet"], "random", FAST, slide_id="001")
    assert other.status == "failed" and "another file" in other.error and "--overwrite" in other.error
    assert open_store(first.store).encoders == ["timm:test_vit"]
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "001.zarr").glob(".*"))


def test_overwrite_replaces_only_the_requested_group(sample_slide, tmp_path):
    opts = EmbedOptions(workers=0, max_patches=6, dtype="float32")
    embed_slide(sample_slide, tmp_path, ["timm:test_vit", "timm:test_resnet"], "random", opts)
    store_dir = tmp_path / "CMU-1-Small-Region.zarr"
    kept = open_store(store_dir).embeddings("timm:test_resnet")[...]
    again = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random",
                        EmbedOptions(workers=0, max_patches=6, dtype="float32", overwrite=True))
    assert again.status == "done"
    store = open_store(store_dir)
    assert sorted(store.encoders) == ["timm:test_resnet", "timm:test_vit"]
    np.testing.assert_array_equal(store.embeddings("timm:test_resnet")[...], kept)
    assert not list(store_dir.glob(".*"))


def test_precision_and_weights_are_recorded(sample_slide, tmp_path):
    result = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random", FAST)
    enc = open_store(result.store).encoder_attrs()
    assert enc["precision"] == "fp32" and enc["dtype"] == "float16" and enc["weights_random"] is True


def test_backends_agree_at_inexact_downsamples(tmp_path, sample_slide):
    """Level downsamples like 4.0007 (sizes not divisible by 4): tiffslide and openslide read the
    same level pixels for each cell (tiffslide truncates level coordinates, openslide does not)."""
    from sample_data.synthetic import make_slide

    path = make_slide(tmp_path / "odd.tif", width=6001, height=5003, mpp=0.25)
    with open_slide(path, backend="openslide") as s:
        ds = s.level_downsamples[1]
        assert ds != 4.0
        grid = plan_grid(GridSpec(1.0, 224), slide_mpp=resolve_mpp(s).mpp, level_dimensions=s.level_dimensions,
                         level_downsamples=s.level_downsamples)
    assert grid.level == 1
    coords = grid.coords()
    ref = openslide.OpenSlide(str(path))
    with open_slide(path, backend="tiffslide") as t:
        for r, c in [(0, 1), (1, 2), (2, 3), (3, 1)]:
            x, y = (int(v) for v in coords[r, c])
            a = t.read_region((x, y), 1, (grid.read_px, grid.read_px)).astype(int)
            b = np.asarray(ref.read_region((x, y), 1, (grid.read_px, grid.read_px)))[..., :3].astype(int)
            assert np.abs(a - b).mean() < 3.0, (r, c, np.abs(a - b).mean())


def test_bad_slide_id_and_bad_manifest_are_refused_up_front(sample_slide, tmp_path):
    from tests.conftest import run_cli

    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,slide_id\n{sample_slide},a/b\n")
    proc = run_cli("embed", "--list", str(listing), "--out", str(tmp_path / "o1"), "--model", "timm:test_vit",
                   "--weights", "random", "--workers", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot name a store" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("embed", str(sample_slide), "--out", str(tmp_path / "o2"), "--manifest", str(blocker / "m.csv"),
                   "--model", "timm:test_vit", "--weights", "random", "--workers", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--manifest" in proc.stderr
    assert not list((tmp_path / "o2").glob("*.zarr"))
