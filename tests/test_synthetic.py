"""Synthetic slides: pyramid + mpp as seen by both readers, tissue only where painted."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tiffslide
from skimage.color import rgb2hsv

from sample_data.synthetic import DEFAULT_SOURCE, make_biopsies, make_slide

needs_source = pytest.mark.skipif(
    not DEFAULT_SOURCE.is_file(), reason="sample slide missing: run `python sample_data/fetch_sample.py`"
)


def _rgb(region) -> np.ndarray:
    return np.asarray(region.convert("RGB"), dtype=np.float32)


def _downsample4(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 4, a.shape[1] // 4
    return a[: h * 4, : w * 4].reshape(h, 4, w, 4, -1).mean(axis=(1, 3))


@needs_source
def test_levels_mpp_and_pixels_agree_in_both_readers(tmp_path):
    path = make_slide(tmp_path / "s.tif", width=4096, height=3072, mpp=0.25, min_level_size=128)
    readers = [(openslide.OpenSlide(path), "openslide.mpp-x"), (tiffslide.TiffSlide(path), "tiffslide.mpp-x")]
    for slide, mpp_key in readers:
        assert slide.level_dimensions == ((4096, 3072), (1024, 768), (256, 192))
        assert tuple(slide.level_downsamples) == (1.0, 4.0, 16.0)
        assert float(slide.properties[mpp_key]) == pytest.approx(0.25)

    os_slide, ts_slide = readers[0][0], readers[1][0]
    level0 = _rgb(os_slide.read_region((0, 0), 0, (2048, 2048)))
    level1 = _rgb(os_slide.read_region((0, 0), 1, (512, 512)))
    # Both readers decode the YCbCr JPEG tiles identically.
    assert np.array_equal(level0, _rgb(ts_slide.read_region((0, 0), 0, (2048, 2048))))
    # Level 1 is the 4x area downsample of level 0, up to JPEG error.
    assert np.abs(level1 - _downsample4(level0)).mean() < 5


@needs_source
def test_no_mpp_when_disabled(tmp_path):
    path = make_slide(tmp_path / "s.tif", width=1024, height=768, write_mpp=False)
    assert "openslide.mpp-x" not in openslide.OpenSlide(path).properties
    assert tiffslide.TiffSlide(path).properties.get("tiffslide.mpp-x") is None


@needs_source
def test_tissue_only_inside_boxes(tmp_path):
    box = (256, 256, 1280, 1024)
    path = make_slide(tmp_path / "s.tif", width=2048, height=1536, tissue_boxes=[box])
    image = np.asarray(tiffslide.TiffSlide(path).read_region((0, 0), 0, (2048, 1536)))
    sat = rgb2hsv(image)[..., 1]
    x0, y0, x1, y1 = box
    inside = sat[y0:y1, x0:x1]
    assert inside.mean() > 0.25
    # No large holes: every 64x64 block inside the box is clearly stained.
    blocks = inside.reshape(inside.shape[0] // 64, 64, inside.shape[1] // 64, 64).mean(axis=(1, 3))
    assert blocks.min() > 0.15
    outside = np.ones(sat.shape, bool)
    outside[y0 - 16 : y1 + 16, x0 - 16 : x1 + 16] = False  # margin for JPEG ringing
    glass = image[outside].astype(np.float64)
    assert np.abs(glass.mean(axis=0) - 236).max() < 2
    assert glass.min() > 220 and sat[outside].max() < 0.05


@needs_source
def test_biopsies(tmp_path):
    paths = make_biopsies(tmp_path, 2, size=(1500, 1000), seed=1)
    assert [p.name for p in paths] == ["biopsy_000.tif", "biopsy_001.tif"]
    for p in paths:
        slide = openslide.OpenSlide(p)
        assert slide.dimensions == (1500, 1000)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)


def test_missing_source_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_sample.py"):
        make_slide(tmp_path / "s.tif", width=512, height=512, source=tmp_path / "missing.svs")
