"""Pixel formats and codecs: every backend against an independent reader (tifffile's own decode,
openslide) on files written here; the conversion rules of wsi_embed.pixels computed independently
from the arrays written; refusals and hints as one line; the thumbnail's guard against miscoloured
pyramid levels; and grey, 16-bit and RGBA slides through the CLI."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import openslide
import pytest
import tifffile

from sample_data.synthetic import area_downsample, sample_rgb, write_pyramid
from tests.conftest import run_cli
from wsi_embed.errors import UnreadableSlide, UnsupportedSlide
from wsi_embed.tiles import TileSource
from wsi_embed.slide import describe, open_slide
from wsi_embed.tissue import TissueParams, read_thumbnail

W, H = 330, 270  # not multiples of the 128 px tiles: partial edge tiles on both axes
WHITE = 255


@pytest.fixture(scope="module")
def rgb(sample_slide) -> np.ndarray:
    image = sample_rgb(W, H, origin=(850, 900), seed=3)
    assert (image.max(axis=2).astype(int) - image.min(axis=2) > 30).mean() > 0.3  # tissue, not just glass
    return image


@pytest.fixture(autouse=True)
def _quiet_tifffile():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def expected_region(level_rgb: np.ndarray, lx: int, ly: int, w: int, h: int) -> np.ndarray:
    """What read_region must return: the level's pixels, white outside the level."""
    out = np.full((h, w, 3), WHITE, np.uint8)
    lh, lw = level_rgb.shape[:2]
    x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
    if x1 > x0 and y1 > y0:
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = level_rgb[y0:y1, x0:x1]
    return out


# unaligned places, a region across tile borders, edge (partial) tiles, part outside the level
REGIONS = [(0, 0, 1, 1), (3, 5, 77, 61), (100, 120, 150, 140), (250, 200, 80, 70), (300, 250, 60, 40),
           (-7, -5, 30, 20)]


# -- 3. every backend equals tifffile's decode on lossless files -------------------------------------
@pytest.mark.parametrize("compression", [None, "lzw", "zlib"], ids=["none", "lzw", "deflate"])
@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_lossless_reads_equal_tifffile(compression, backend, rgb, tmp_path):
    levels = [rgb, area_downsample(rgb, 2)]
    path = write_pyramid(tmp_path / "lossless.tif", levels, tile=128, compression=compression, photometric="rgb")
    with tifffile.TiffFile(path) as tf:  # the independent decode
        decoded = [tf.series[0].levels[k].asarray() for k in range(2)]
    assert all(np.array_equal(d, lv) for d, lv in zip(decoded, levels))
    with open_slide(path, backend=backend) as slide:
        assert slide.backend == backend and slide.level_count == 2
        for level, truth in enumerate(decoded):
            ds = round(slide.level_downsamples[level])
            for lx, ly, w, h in REGIONS:
                got = slide.read_region((lx * ds, ly * ds), level, (w, h))
                assert got.dtype == np.uint8 and got.shape == (h, w, 3)
                np.testing.assert_array_equal(got, expected_region(truth, lx, ly, w, h),
                                              err_msg=f"level {level} region {(lx, ly, w, h)}")
        assert describe(slide, None).pixel_conversion is None


# -- 1. pixel formats: the rule, computed here from what was written ----------------------------------
def _grey(rgb):
    return np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)


def _rep(grey8):
    return np.repeat(grey8[..., None], 3, axis=2)


def _alpha(rgb):
    h, w = rgb.shape[:2]
    a = (np.add.outer(np.arange(h), np.arange(w)) * 7 % 256).astype(np.uint8)  # every value, 0 and 255 too
    a[: h // 3] = 255
    a[h // 3 : h // 3 + 5] = 0
    return a


def _colormap():
    rng = np.random.default_rng(5)
    return rng.integers(0, 65536, (3, 256)).astype(np.uint16)


def _float01(rgb):
    f = rgb.astype(np.float32) / 255 + np.float32(0.0007)
    f[0, :4, 0] = [-0.5, 1.7, np.nan, 0.5]  # out of range and NaN
    return f


def _float01_expected(f):
    e = np.rint(np.clip(f, 0, 1) * 255)
    e[np.isnan(f)] = 255
    return e.astype(np.uint8)


def _sixteen(rgb):
    return (rgb.astype(np.uint32) * 257 + (rgb.astype(np.uint32) * 31) % 257 - 128).clip(0, 65535).astype(np.uint16)


# kind: (make data from an RGB level, tifffile options, expected RGB8 from the data, openslide reads it,
#        words the recorded rule must contain)
FORMATS = {
    "grey8": (lambda c: _grey(c), dict(photometric="minisblack"), _rep, True, ["grey repeated"]),
    "grey16": (lambda c: _sixteen(c[..., 1]), dict(photometric="minisblack"),
               lambda d: _rep(np.rint(d / 65535 * 255).astype(np.uint8)), False, ["16-bit", "65535", "grey"]),
    "grey12-in-16": (lambda c: (_grey(c).astype(np.uint16) * 16 + 7).astype(np.uint16),
                     dict(photometric="minisblack", extratags=[(281, "H", 1, 4095, True)]),
                     lambda d: _rep(np.rint(np.minimum(d, 4095) / 4095 * 255).astype(np.uint8)), False,
                     ["4095", "MaxSampleValue"]),
    "rgb16": (_sixteen, dict(photometric="rgb"), lambda d: np.rint(d / 65535 * 255).astype(np.uint8), True,
              ["16-bit", "65535"]),
    "float32": (_float01, dict(photometric="rgb"), _float01_expected, False, ["float32", "0..1"]),
    "float32-smax": (lambda c: c.astype(np.float32) * 4,
                     dict(photometric="rgb", extratags=[(340, "f", 1, 0.0, True), (341, "f", 1, 1020.0, True)]),
                     lambda d: np.rint(d / 4).astype(np.uint8), False, ["SMaxSampleValue"]),
    "rgba": (lambda c: np.dstack([c, _alpha(c)]), dict(photometric="rgb", extrasamples=["unassalpha"]),
             lambda d: np.rint(d[..., :3] * (d[..., 3:] / 255) + (255 - d[..., 3:].astype(float))).astype(np.uint8),
             True, ["alpha composited on white"]),
    "rgba-premultiplied": (lambda c: np.dstack([np.rint(c * (_alpha(c)[..., None] / 255)).astype(np.uint8), _alpha(c)]),
                           dict(photometric="rgb", extrasamples=["assocalpha"]),
                           lambda d: (d[..., :3].astype(int) + 255 - d[..., 3:]).astype(np.uint8), True,
                           ["premultiplied alpha"]),
    "grey+alpha": (lambda c: np.dstack([_grey(c), _alpha(c)]), dict(photometric="minisblack", extrasamples=["unassalpha"]),
                   lambda d: _rep(np.rint(d[..., 0] * (d[..., 1] / 255) + 255 - d[..., 1].astype(float)).astype(np.uint8)),
                   False, ["grey", "alpha"]),
    "palette": (lambda c: _grey(c), dict(photometric="palette", colormap=_colormap()),
                lambda d: (_colormap() >> 8).T.astype(np.uint8)[d], True, ["palette", "colormap"]),
    "palette-8bit-entries": (lambda c: _grey(c), dict(photometric="palette", colormap=_colormap() >> 8),
                             lambda d: (_colormap() >> 8).T.astype(np.uint8)[d], True, ["palette", "8-bit entries"]),
    "miniswhite": (lambda c: _grey(c), dict(photometric="miniswhite"), lambda d: _rep(255 - d), True, ["MinIsWhite"]),
    # 8-bit containers that are not 8-bit full scale: never read as they are stored (the tile reader too)
    "rgb8-max200": (lambda c: np.rint(c * (200 / 255)).astype(np.uint8),
                    dict(photometric="rgb", extratags=[(281, "H", 1, 200, True)]),
                    lambda d: np.rint(np.minimum(d, 200) / 200 * 255).astype(np.uint8), False, ["200", "MaxSampleValue"]),
    "rgb4": (lambda c: c >> 4, dict(photometric="rgb", bitspersample=4, compression=None),
             lambda d: np.rint(d / 15 * 255).astype(np.uint8), False, ["4-bit"]),
    "rgbx": (lambda c: np.dstack([c, _alpha(c)]), dict(photometric="rgb", extrasamples=["unspecified"]),
             lambda d: d[..., :3], False, ["unspecified extra sample ignored"]),
}


@pytest.fixture(scope="module")
def format_slides(rgb, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("formats")
    out = {}
    for kind, (make, options, expect, _, _) in FORMATS.items():
        data = [make(rgb), make(area_downsample(rgb, 2))]
        path = write_pyramid(folder / f"{kind}.tif", data, tile=128, **{"compression": "zlib", **options})
        with tifffile.TiffFile(path) as tf:  # what the file holds, decoded by tifffile
            decoded = [tf.series[0].levels[k].asarray() for k in range(2)]
        out[kind] = path, [expect(d) for d in decoded]
    return out


@pytest.mark.parametrize("backend", ["auto", "tiffslide", "openslide"])
@pytest.mark.parametrize("kind", list(FORMATS))
def test_pixel_format_becomes_rgb8(kind, backend, format_slides):
    path, truths = format_slides[kind]
    openslide_reads, words = FORMATS[kind][3], FORMATS[kind][4]
    if backend == "openslide" and not openslide_reads:
        with pytest.raises(UnsupportedSlide) as err:
            open_slide(path, backend="openslide")
        msg = str(err.value)
        assert str(path) in msg and "openslide cannot read" in msg and "--backend tiffslide" in msg, msg
        assert "\n" not in msg and "corrupt" not in msg
        return
    # openslide: libtiff's RGBA round trip (premultiply, un-premultiply) may move alpha pixels by 1
    tolerance = 1 if backend == "openslide" and "alpha" in " ".join(words) else 0
    with open_slide(path, backend=backend) as slide:
        if backend == "auto" and not openslide_reads:
            assert slide.backend == "tiffslide"
        for level, truth in enumerate(truths):
            assert truth.mean() > 40  # the truth itself is not black
            ds = round(slide.level_downsamples[level])
            for lx, ly, w, h in REGIONS:
                got = slide.read_region((lx * ds, ly * ds), level, (w, h))
                assert got.dtype == np.uint8 and got.shape == (h, w, 3)
                diff = np.abs(got.astype(int) - expected_region(truth, lx, ly, w, h)).max()
                assert diff <= tolerance, (kind, backend, level, (lx, ly, w, h), diff)
        rule = describe(slide, None).pixel_conversion
        assert rule and all(word in rule for word in words), rule
        tiles = TileSource.open(path, slide.level_dimensions)  # what the loader reads where it can
        for level, truth in enumerate(truths):
            if tiles is not None and tiles.supports(level):
                h, w = truth.shape[:2]
                np.testing.assert_array_equal(tiles.read_region(level, 0, 0, w, h), truth, err_msg=f"{kind} {level}")


REFUSED = {
    "2-channel": (lambda c: c[..., :2].copy(), dict(photometric="minisblack", planarconfig="contig"), "2 samples"),
    "cmyk": (lambda c: np.dstack([c, c[..., :1]]), dict(photometric="separated"), "CMYK"),
    "complex": (lambda c: (c[..., 0] + 1j * c[..., 1]).astype(np.complex64), dict(photometric="minisblack"), "complex"),
    "5-channel": (lambda c: np.dstack([c, c[..., :2]]), dict(photometric="rgb", extrasamples=["unspecified"] * 2),
                  "5 samples"),
    "signed": (lambda c: c[..., 0].astype(np.int16) - 128, dict(photometric="minisblack"), "signed"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unsupported_pixel_formats_are_refused_at_open(kind, rgb, tmp_path):
    make, options, word = REFUSED[kind]
    path = write_pyramid(tmp_path / f"{kind}.tif", [make(rgb)], tile=128, **options)
    for backend in ("auto", "tiffslide", "openslide"):
        with pytest.raises(UnsupportedSlide) as err:
            open_slide(path, backend=backend)
        msg = str(err.value)
        assert msg.startswith(f"{path}: unsupported pixel format") and word in msg and "\n" not in msg, msg
        assert "corrupt" not in msg and "--backend" not in msg


# -- 2. compressions ----------------------------------------------------------------------------------
def _ycbcr(rgb):
    """JFIF RGB -> YCbCr, as Aperio and libvips store JPEG 2000 tiles."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.rint(np.dstack([y, cb, cr])), 0, 255).astype(np.uint8)


APERIO = "Aperio Image Library v10.0.50\r\n330x270 [0,0 330x270] (128x128) J2K/YUV16 Q=100|AppMag = 20|MPP = 0.5"


def test_aperio_ycbcr_jpeg2000_33003_matches_openslide(rgb, tmp_path):
    """Aperio 33003 tiles hold YCbCr without the codestream's colour transform: tiffslide hands the
    planes back as they are (mean error ~60 before); they must come out as openslide decodes them."""
    path = tmp_path / "j2k.svs"
    j2k = dict(tile=(128, 128), compression=33003, compressionargs={"mct": False, "reversible": True},
               photometric="rgb", metadata=None)
    with tifffile.TiffWriter(path) as tw:  # as Aperio lays it out: level 0, thumbnail (stripped), level 1
        tw.write(_ycbcr(rgb), description=APERIO, **j2k)
        tw.write(area_downsample(rgb, 8), photometric="rgb", description="Aperio Image Library v10.0.50\r\nthumb",
                 metadata=None)
        tw.write(_ycbcr(area_downsample(rgb, 2)), description="Aperio Image Library v10.0.50\r\n165x135", **j2k)
    reference = openslide.OpenSlide(str(path))
    assert reference.properties["openslide.vendor"] == "aperio"
    with open_slide(path, backend="auto") as slide:
        assert slide.backend == "tiffslide"
        for level in range(2):
            lw, lh = slide.level_dimensions[level]
            got = slide.read_region((0, 0), level, (lw, lh)).astype(int)
            ref = np.asarray(reference.read_region((0, 0), level, (lw, lh)))[..., :3].astype(int)
            assert np.abs(got - ref).max() <= 1 and np.abs(got - ref).mean() < 0.1
            truth = rgb if level == 0 else area_downsample(rgb, 2)
            assert np.abs(got - truth).mean() < 1.0  # lossless YCbCr round trip
        assert "33003" in describe(slide, None).pixel_conversion
    reference.close()


def test_libvips_ycbcr_jpeg2000_33004(rgb, tmp_path):
    """libvips writes JPEG 2000 tiles as compression 33004: YCbCr, with the codestream's colour
    transform on top. openslide cannot read it; tiffslide must decode it to the original colours."""
    path = write_pyramid(tmp_path / "vips.tif", [_ycbcr(rgb)], tile=128, compression=33004,
                         compressionargs={"mct": True, "reversible": True}, photometric="rgb")
    with open_slide(path, backend="auto") as slide:
        assert slide.backend == "tiffslide"
        got = slide.read_region((0, 0), 0, (W, H)).astype(int)
        assert np.abs(got - rgb).mean() < 1.0 and np.abs(got - rgb).max() <= 3
    with pytest.raises(UnsupportedSlide) as err:
        open_slide(path, backend="openslide")
    msg = str(err.value)
    assert "unsupported compression 33004 (JPEG_2000_LOSSY)" in msg and "--backend tiffslide" in msg, msg
    assert "corrupt" not in msg


@pytest.mark.parametrize("compression,number,name", [("webp", 50001, "WEBP"), ("jpeg2000", 34712, "JPEG2000")])
def test_openslide_names_a_compression_it_lacks(compression, number, name, rgb, tmp_path):
    args = {"lossless": True} if compression == "webp" else {"reversible": True}
    path = write_pyramid(tmp_path / f"{compression}.tif", [rgb], tile=128, compression=compression,
                         compressionargs=args, photometric="rgb")
    with pytest.raises(UnsupportedSlide) as err:
        open_slide(path, backend="openslide")
    msg = str(err.value)
    assert msg == f"{path}: unsupported compression {number} ({name}) for openslide; use --backend tiffslide " \
                  "(or auto), which reads it"
    with open_slide(path) as slide, tifffile.TiffFile(path) as tf:  # auto reads it, as tifffile decodes it
        assert slide.backend == "tiffslide"
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (W, H)), tf.pages[0].asarray())
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (W, H)), rgb)  # lossless


def test_no_hint_to_a_backend_that_cannot_read_it(rgb, tmp_path):
    # a compression no backend here decodes: neither is suggested
    path = write_pyramid(tmp_path / "unknown.tif", [rgb], tile=128, compression=None, photometric="rgb")
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tf.pages[0].tags["Compression"].overwrite(60000)
    for backend in ("auto", "openslide", "tiffslide"):
        with pytest.raises(UnsupportedSlide) as err:
            open_slide(path, backend=backend)
        msg = str(err.value)
        assert "unsupported compression 60000" in msg and "--backend" not in msg and "\n" not in msg, (backend, msg)
    # a CZI file: openslide cannot read it and neither can tiffslide
    czi = tmp_path / "scan.czi"
    czi.write_bytes(b"ZISRAWFILE" + bytes(200))
    for backend in ("auto", "openslide", "tiffslide"):
        with pytest.raises(UnreadableSlide) as err:
            open_slide(czi, backend=backend)
        msg = str(err.value)
        assert msg.startswith(f"{czi}: not a whole-slide image") and "CZI" in msg and "--backend" not in msg, msg
    # planar RGB: tiffslide cannot, openslide can, so the hint names openslide (and auto uses it)
    planar = write_pyramid(tmp_path / "planar.tif", [np.ascontiguousarray(rgb.transpose(2, 0, 1))], tile=128,
                           photometric="rgb", planarconfig="separate")
    with pytest.raises(UnsupportedSlide) as err:
        open_slide(planar, backend="tiffslide")
    assert "planar" in str(err.value) and "--backend openslide" in str(err.value)
    with open_slide(planar) as slide:
        assert slide.backend == "openslide"
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (W, H)), rgb)


# -- 4. the thumbnail does not trust a miscoloured pyramid level --------------------------------------
@pytest.fixture(scope="module")
def big_rgb(sample_slide) -> np.ndarray:
    return sample_rgb(2048, 2048, seed=1)


@pytest.mark.parametrize("fault", ["ycbcr", "bgr"])
def test_thumbnail_falls_back_from_a_miscoloured_level(fault, big_rgb, tmp_path, caplog):
    """Levels 1, 4, 16: the 4 µm/px thumbnail comes from level 2 (8 µm/px). Written in YCbCr (or
    BGR) labelled RGB, it must be caught and a finer level used: the thumbnail keeps level 0's colours."""
    bad = {"ycbcr": _ycbcr, "bgr": lambda c: np.ascontiguousarray(c[..., ::-1])}[fault]
    levels = [big_rgb, area_downsample(big_rgb, 4), area_downsample(big_rgb, 16)]
    good_path = write_pyramid(tmp_path / "good.tif", levels, compression="jpeg", photometric="rgb")
    bad_path = write_pyramid(tmp_path / "bad.tif", levels[:2] + [bad(levels[2])], compression="jpeg",
                             photometric="rgb")
    params = TissueParams()
    with caplog.at_level(logging.WARNING, logger="wsi_embed.tissue"):
        with open_slide(good_path) as slide:
            good = read_thumbnail(slide, 0.5, params)
        assert not caplog.records  # a faithful pyramid raises no alarm
        with open_slide(bad_path) as slide:
            assert slide.level_count == 3
            miscoloured = slide.read_region((0, 0), 2, slide.level_dimensions[2])
            thumb = read_thumbnail(slide, 0.5, params)
    assert any("level 2 looks miscoloured" in r.getMessage() and "from level 1" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert np.abs(miscoloured.astype(int) - area_downsample(big_rgb, 16)).mean() > 5  # the level is off
    for t in (good, thumb):  # both have level 0's colours, at their own sizes (8 and 4 µm/px)
        truth = area_downsample(big_rgb, 2048 // t.image.shape[1]).astype(int)
        assert t.image.shape == truth.shape
        assert np.abs(t.image - truth).mean() < 3
    assert thumb.image.shape[1] == 2 * good.image.shape[1]  # read from level 1, at the 4 µm/px asked for


# -- grey, 16-bit and RGBA slides end to end ------------------------------------------------------------
def test_a_file_whose_first_image_is_not_its_largest_is_refused(big_rgb, tmp_path):
    """An overview written first (OME-TIFF) or a pyramid written smallest first: the readers take the
    first image for level 0 and the patches would be upsampled from it."""
    small = area_downsample(big_rgb, 8)
    overview = tmp_path / "overview-first.ome.tif"
    with tifffile.TiffWriter(overview, ome=True) as tif:
        tif.write(small, photometric="rgb", metadata={"Name": "macro", "PhysicalSizeX": 4.0, "PhysicalSizeY": 4.0})
        tif.write(big_rgb, tile=(256, 256), compression="jpeg", photometric="rgb",
                  metadata={"Name": "main", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    reversed_ = write_pyramid(tmp_path / "reversed.tif", [small, area_downsample(big_rgb, 2)],
                              compression="jpeg", photometric="rgb")
    for path in (overview, reversed_):
        with pytest.raises(UnsupportedSlide) as err:
            open_slide(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: the slide is read from its first image (256 x 256 px)") and "\n" not in msg
        assert "re-export it with the full-resolution image first" in msg
    with open_slide(write_pyramid(tmp_path / "fine.tif", [big_rgb, small], compression="jpeg",
                                  photometric="rgb")) as slide:
        assert slide.dimensions == (2048, 2048)
    # a small cropped export that kept its (stripped) macro image: the macro is no slide level
    cropped = tmp_path / "cropped.tif"
    with tifffile.TiffWriter(cropped) as tif:
        tif.write(small, tile=(128, 128), compression="jpeg", photometric="rgb")
        tif.write(big_rgb, photometric="rgb", subfiletype=1, rowsperstrip=16)
    with open_slide(cropped) as slide:
        assert slide.dimensions == (256, 256)


def test_patches_are_not_read_from_a_miscoloured_level(big_rgb, tmp_path, caplog):
    """Level 1 (4x, 2 µm/px) written in YCbCr labelled RGB: a 2 µm/px grid would read its patches
    there; they come from level 0 instead (the thumbnail alone falling back is not enough)."""
    from wsi_embed.jobs import EmbedOptions
    from wsi_embed.grid import GridSpec
    from wsi_embed.plan import plan_slide
    from wsi_embed.slide import resolve_mpp

    levels = [big_rgb, area_downsample(big_rgb, 4), area_downsample(big_rgb, 16)]
    opts = EmbedOptions(grid=GridSpec(mpp=2.0, patch_px=64))
    plans = {}
    for name, pyramid in [("good", levels), ("bad", [levels[0], _ycbcr(levels[1]), levels[2]])]:
        path = write_pyramid(tmp_path / f"{name}.tif", pyramid, compression="jpeg", photometric="rgb")
        caplog.clear()
        with caplog.at_level(logging.WARNING), open_slide(path) as slide:
            plans[name] = plan_slide(slide, resolve_mpp(slide, 0.5), opts, name)
        plans[name + "_log"] = [r.getMessage() for r in caplog.records]
    assert plans["good"].grid.level == 1 and not plans["good_log"]
    bad = plans["bad"].grid
    assert bad.level == 0 and bad.read_px == 256, bad
    assert any("level 1 looks miscoloured" in m and "patches are read from level 0" in m for m in plans["bad_log"])
    # the same cells either way: only where they are read from changes
    np.testing.assert_array_equal(plans["bad"].mask, plans["good"].mask)


@pytest.fixture(scope="module")
def cli_slides(big_rgb, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cli_slides")
    rgb = big_rgb[:1024, :1536]
    out = {}
    for kind in ("grey8", "rgb16", "rgba"):
        make, options = FORMATS[kind][:2]
        if kind == "rgba":  # as scanners write it: opaque, with a transparent unscanned margin on the left
            alpha = np.clip((np.arange(rgb.shape[1]) - 128) * 4, 0, 255).astype(np.uint8)
            make = lambda c: np.dstack([c, np.broadcast_to(alpha[:: rgb.shape[1] // c.shape[1]], c.shape[:2])])
        out[kind] = write_pyramid(folder / f"{kind}.tif", [make(rgb), make(area_downsample(rgb, 4))],
                                  compression="zlib", **options)
    return out


def test_tissue_is_found_on_16bit_and_rgba_slides(cli_slides, big_rgb):
    from wsi_embed.tissue import detect_tissue

    params = TissueParams()
    masks = {}
    for kind in ("rgb16", "rgba"):
        with open_slide(cli_slides[kind]) as slide:
            thumb = read_thumbnail(slide, 0.5, params)
        masks[kind] = mask = detect_tissue(thumb, params)
        assert thumb.image.mean() > 150 and 0.05 < mask.mean() < 0.9, (kind, thumb.image.mean(), mask.mean())
    margin = 192 * masks["rgba"].shape[1] // 1536  # right of RGBA's transparent margin: the same tissue
    assert (masks["rgba"][:, margin:] == masks["rgb16"][:, margin:]).mean() > 0.97
    assert not masks["rgba"][:, : margin // 2].any()  # the transparent margin is white glass


def test_cli_embeds_grey_16bit_and_rgba_slides(cli_slides, tmp_path):
    """One run, three slides, no traceback, every slide done with tissue cells embedded (grey has no
    saturation: its tissue is found by darkness)."""
    out = tmp_path / "out"
    paths = [str(cli_slides[k]) for k in ("grey8", "rgb16", "rgba")]
    proc = run_cli("embed", *paths, "--out", str(out), "--model", "timm:test_vit", "--weights", "random",
                   "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    from wsi_embed import open_store

    for kind in ("grey8", "rgb16", "rgba"):
        assert f"done    {kind}:" in proc.stdout, proc.stdout
        store = open_store(out / f"{kind}.zarr")
        assert 0 < store.mask.sum() < store.mask.size  # tissue found, glass left out
        assert store.attrs["tissue"]["method"].startswith("darkness" if kind == "grey8" else "saturation")
        rule = store.attrs["slide"]["pixel_conversion"]
        assert all(word in rule for word in FORMATS[kind][4]), rule
        assert store.root["thumbnail"][...].mean() > 150  # glass stays white, not black
