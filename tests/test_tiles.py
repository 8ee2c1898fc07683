"""Native tile reads give the slide readers' pixels: the sample SVS (240 px RGB-coded JPEG tiles with
JPEGTables), a YCbCr JPEG pyramid, lossless LZW and deflate pyramids, a 0.25 µm/px pyramid, edge and
partial tiles, and regions that are not aligned to tiles."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from sample_data.synthetic import make_slide, sample_rgb, write_pyramid
from wsi_embed.tiles import TileSource

# (x, y, w, h) in level pixels: aligned, unaligned, across many tiles, past the right/bottom edge, outside
PLACES = [(0, 0, 240, 240), (237, 481, 700, 650), (1000, 1300, 224, 224), (5, 3, 17, 900)]


def openslide_rgb(slide: openslide.OpenSlide, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    ds = slide.level_downsamples[level]
    rgba = np.asarray(slide.read_region((round(x * ds), round(y * ds)), level, (w, h)))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255  # nothing scanned there: white, as every reader here gives it
    return rgb


def edge_places(width: int, height: int) -> list[tuple[int, int, int, int]]:
    return [(width - 100, height - 80, 300, 250), (width + 10, 0, 50, 50), (-20, -30, 100, 90)]


def test_sample_svs_equals_openslide(sample_slide):
    ref = openslide.OpenSlide(str(sample_slide))
    src = TileSource.open(sample_slide, ref.level_dimensions)
    assert src is not None and src.supports(0) and src.levels[0].tile_w == 240
    w, h = ref.level_dimensions[0]
    for x, y, pw, ph in PLACES + edge_places(w, h):
        ours = src.read_region(0, x, y, pw, ph).astype(int)
        theirs = openslide_rgb(ref, 0, x, y, pw, ph).astype(int)
        diff = np.abs(ours - theirs)
        assert diff.max() <= 2 and diff.mean() <= 0.5, ((x, y, pw, ph), diff.max(), diff.mean())


def test_tiles_without_their_closing_marker_decode_and_cut_tiles_fail(tmp_path, sample_slide):
    """Some writers leave out each tile's EOI marker (readers add it); a tile cut short elsewhere is damage."""
    import shutil

    from wsi_embed.errors import UnreadableSlide

    def shorten(path, by):
        with tifffile.TiffFile(path, mode="r+b") as tif:
            page = tif.pages[0]
            page.tags["TileByteCounts"].overwrite([n - by(i) for i, n in enumerate(page.databytecounts)])

    ref = TileSource.open(sample_slide)
    w, h = ref.levels[0].width, ref.levels[0].height
    no_eoi = shutil.copy(sample_slide, tmp_path / "no-eoi.svs")
    shorten(no_eoi, lambda i: 2)
    src = TileSource.open(no_eoi)
    assert src.raw_tile(0, 1, 1)[-2:] != b"\xff\xd9"
    np.testing.assert_array_equal(src.read_region(0, 0, 0, w, h), ref.read_region(0, 0, 0, w, h))
    assert src.jpeg_stream(0, 1, 1) == ref.jpeg_stream(0, 1, 1)  # what the device decoder is given
    cut = shutil.copy(sample_slide, tmp_path / "cut.svs")
    shorten(cut, lambda i: 200 if i == 0 else 0)
    with pytest.raises(UnreadableSlide, match="cannot decode pixels at level 0, tile \\(0, 0\\)"):
        TileSource.open(cut).read_region(0, 0, 0, 100, 100)


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_ycbcr_jpeg_pyramid_matches_openslide(tmp_path, sample_slide, mpp):
    path = make_slide(tmp_path / "ycbcr.tif", width=3000, height=2600, mpp=mpp)
    ref = openslide.OpenSlide(str(path))
    src = TileSource.open(path, ref.level_dimensions)
    assert src is not None
    for level in range(ref.level_count):
        assert src.supports(level)
        w, h = ref.level_dimensions[level]
        for x, y, pw, ph in [p for p in PLACES if p[0] < w and p[1] < h] + edge_places(w, h):
            ours = src.read_region(level, x, y, pw, ph).astype(int)
            diff = np.abs(ours - openslide_rgb(ref, level, x, y, pw, ph).astype(int))
            assert diff.max() <= 2 and diff.mean() <= 0.5, (level, (x, y), diff.max(), diff.mean())


@pytest.mark.parametrize("compression", ["lzw", "zlib", None])
def test_lossless_pyramids_are_exact(tmp_path, sample_slide, compression):
    base = sample_rgb(1500, 1100)
    path = write_pyramid(tmp_path / f"{compression}.tif", [base, base[::4, ::4].copy()], tile=256,
                         compression=compression, photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        truth = [page.asarray() for page in tif.pages]
    ref = openslide.OpenSlide(str(path))
    src = TileSource.open(path, ref.level_dimensions)
    assert src is not None
    for level, full in enumerate(truth):
        h, w = full.shape[:2]
        for x, y, pw, ph in PLACES + edge_places(w, h):
            ours = src.read_region(level, x, y, pw, ph)
            expected = np.full((ph, pw, 3), 255, np.uint8)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
            if x1 > x0 and y1 > y0:
                expected[y0 - y : y1 - y, x0 - x : x1 - x] = full[y0:y1, x0:x1]
            np.testing.assert_array_equal(ours, expected)


def test_formats_without_native_support_fall_back(tmp_path, sample_slide):
    grey = sample_rgb(600, 500)[..., 0].copy()
    path = write_pyramid(tmp_path / "grey.tif", [grey], tile=256, compression="zlib", photometric="minisblack")
    assert TileSource.open(path, [(600, 500)]) is None  # grey: the slide reader converts it
    assert TileSource.open(sample_slide, [(1, 1)]) is None  # levels that are not the reader's levels


def test_a_file_cut_while_it_is_read_names_the_tile_and_the_fix(tmp_path, sample_slide):
    import os
    import shutil

    from wsi_embed.errors import UnreadableSlide

    path = shutil.copy(sample_slide, tmp_path / "s.svs")
    src = TileSource.open(path)
    last = int(src.levels[0].offsets[-1, -1])
    os.truncate(path, last + 10)  # overwritten in place by a shorter file while it is open
    ty, tx = (int(i) for i in np.argwhere(src.levels[0].offsets == last)[0])
    with pytest.raises(UnreadableSlide, match=rf"{path}: level 0, tile \({tx}, {ty}\) is cut short .* re-copy it"):
        src.raw_tile(0, ty, tx)
