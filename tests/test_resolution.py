"""Resolution you can trust, size limits, DICOM folders and `info`: real files written here (tifffile,
pydicom, by hand), opened with the real readers."""

from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import pytest
import tifffile

from tests.conftest import run_cli
from wsi_embed.cohort.discover import build_jobs, find_slides
from wsi_embed.errors import InvalidOption, MissingMpp, SlideOutOfLimits, UnreadableSlide
from wsi_embed.slide import MAX_TILE_PX, describe, ensure_intact, open_slide, resolve_mpp, tiff_damage

BACKENDS = ("tiffslide", "openslide")


def _tiff(path, *, size=512, tile=256, **options):
    """A small tiled RGB TIFF with the given tifffile options (resolution, description, ...)."""
    rng = np.random.default_rng(0)
    image = rng.integers(120, 230, (size, size, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(tile, tile), photometric="rgb", compression="zlib", **options)
    return path


# -- resolution --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("res, unit", [((72, 72), "INCH"), ((96, 96), "INCH"), ((28.35, 28.35), "CENTIMETER"),
                                       ((37.8, 37.8), "CENTIMETER"), ((50, 50), "CENTIMETER")])
def test_screen_dpi_or_coarser_than_100_um_is_no_resolution(tmp_path, backend, res, unit):
    path = _tiff(tmp_path / "export.tif", resolution=res, resolutionunit=unit)
    with open_slide(path, backend=backend) as s:
        assert s.metadata_mpp is None
        with pytest.raises(MissingMpp) as err:
            resolve_mpp(s)
        message = str(err.value)
        assert str(path) in message and "--slide-mpp" in message and "dpi" in message
        assert "\n" not in message
        override = resolve_mpp(s, 0.5)
        assert (override.mpp, override.source) == (0.5, "override")


def test_dpi_default_falls_through_to_objective_power(tmp_path):
    desc = "Aperio Image Library v12.0.15 \r\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=70|AppMag = 20|Filename = x"
    path = _tiff(tmp_path / "svs72.svs", description=desc, resolution=(72, 72), resolutionunit="INCH")
    with open_slide(path, backend="tiffslide") as s:
        mpp = resolve_mpp(s)
    assert (mpp.mpp, mpp.source) == (pytest.approx(0.5), "objective-power")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field, mpp, source, warned", [
    ("0,4990", 0.499, "metadata", False),  # a scanner in a decimal-comma locale
    ("0.0000", 0.5, "objective-power", True), ("NaN   ", 0.5, "objective-power", True),
])
def test_an_aperio_mpp_field_with_a_comma_or_no_value(sample_slide, tmp_path, caplog, backend, field, mpp, source,
                                                      warned):
    data = sample_slide.read_bytes()
    assert b"MPP = 0.4990" in data  # in each image's description
    path = tmp_path / "s.svs"
    path.write_bytes(data.replace(b"MPP = 0.4990", b"MPP = " + field.encode()))
    with open_slide(path, backend=backend) as s, caplog.at_level("WARNING"):
        got = resolve_mpp(s)
    assert (got.mpp, got.source) == (pytest.approx(mpp), source)
    said = [r.getMessage() for r in caplog.records if "µm/px, not a resolution" in r.getMessage()]
    assert len(said) == warned and all(str(path) in line and "--slide-mpp" in line for line in said)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finer_than_0_05_um_is_refused_unless_overridden(tmp_path, backend):
    path = _tiff(tmp_path / "tiny.tif", resolution=(1e6, 1e6), resolutionunit="CENTIMETER")  # 0.01 µm/px
    with open_slide(path, backend=backend) as s:
        with pytest.raises(SlideOutOfLimits) as err:
            resolve_mpp(s)
        assert str(path) in str(err.value) and "0.01" in str(err.value) and "--slide-mpp" in str(err.value)
        assert resolve_mpp(s, 0.25).mpp == 0.25


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixels_that_are_not_square_are_refused_unless_overridden(tmp_path, backend):
    """0.499 across, 0.998 down: averaged, the cells were 112 µm wide and 150 µm tall, silently."""
    path = _tiff(tmp_path / "aniso.tif", resolution=(1e4 / 0.499, 1e4 / 0.998), resolutionunit="CENTIMETER")
    with open_slide(path, backend=backend) as s:
        with pytest.raises(SlideOutOfLimits, match=r"its pixels are not square \(0.499 µm/px across, 0.998 down\)"):
            resolve_mpp(s)
        assert resolve_mpp(s, 0.5).mpp == 0.5
    near = _tiff(tmp_path / "near.tif", resolution=(1e4 / 0.2527, 1e4 / 0.2531), resolutionunit="CENTIMETER")
    with open_slide(near, backend=backend) as s:  # a real scanner's two axes
        assert resolve_mpp(s).mpp == pytest.approx(0.2529)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slide_mpp_overrides_the_file(tmp_path, backend):
    path = _tiff(tmp_path / "scan.tif", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_slide(path, backend=backend) as s:
        assert (resolve_mpp(s).mpp, resolve_mpp(s).source) == (pytest.approx(0.5), "metadata")
        assert (resolve_mpp(s, 0.2465).mpp, resolve_mpp(s, 0.2465).source) == (0.2465, "override")
        for bad in (0.01, 0.0, -1.0, 500.0, math.nan, math.inf):
            with pytest.raises(InvalidOption) as err:
                resolve_mpp(s, bad)
            assert "--slide-mpp" in str(err.value) and "0.05-100" in str(err.value)


def _ome_tiff(path, meta):
    image = np.random.default_rng(1).integers(120, 230, (1024, 1024, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(image, tile=(256, 256), photometric="rgb", compression="zlib", subifds=1, metadata=meta)
        tw.write(image[::4, ::4], tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1)
    return path


def test_ome_xml_pixels_that_are_not_square_are_refused(tmp_path):
    path = _ome_tiff(tmp_path / "oblong.ome.tif", {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.6})
    with open_slide(path) as s, pytest.raises(SlideOutOfLimits, match="not square .*0.5 µm/px across, 0.6 down"):
        resolve_mpp(s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size, unit, expect", [(250, "nm", 0.25), (0.0005, "mm", 0.5), (0.5, None, 0.5)])
def test_ome_xml_physical_size(tmp_path, backend, size, unit, expect):
    """An OME-TIFF pyramid (SubIFD levels, as tifffile writes them) whose only resolution is its
    OME-XML; neither reader reports it, wsi-embed reads it as "metadata"."""
    meta = {"PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit:
        meta.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    path = _ome_tiff(tmp_path / "plain.ome.tif", meta)
    with open_slide(path, backend=backend) as s:
        assert not s.properties.get(f"{backend}.mpp-x")  # the reader itself does not see it
        mpp = resolve_mpp(s)
        assert (mpp.mpp, mpp.source) == (pytest.approx(expect), "metadata")
        if backend == "tiffslide":
            assert s.level_count == 2  # the SubIFD level
    assert tiff_damage(path) is None


def test_info_and_embed_agree_on_resolution(tmp_path):
    path = _tiff(tmp_path / "export72.tif", resolution=(72, 72), resolutionunit="INCH")
    proc = run_cli("info", str(path))
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("mpp"))
    assert "none" in line and "72 dpi" in line and "--slide-mpp" in line
    proc = run_cli("info", str(path), "--slide-mpp", "0.3", "--json")
    d = json.loads(proc.stdout)
    assert (d["mpp"], d["mpp_source"], d["mpp_problem"]) == (0.3, "override", None)
    proc = run_cli("info", str(path), "--slide-mpp", "500")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [proc.stderr.strip()]
    assert "--slide-mpp" in proc.stderr and "0.05-100" in proc.stderr
    out = tmp_path / "out"
    proc = run_cli("embed", str(path), "--out", str(out), "--model", "timm:test_vit", "--weights", "random",
                   "--workers", "0")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in errors[0] and "--slide-mpp" in errors[0] and "72 dpi" in errors[0]
    assert not list(out.glob("*.zarr"))


# -- limits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_tiles_over_16k_are_refused_at_open(tmp_path, backend):
    path = tmp_path / "widetiles.tif"
    image = np.full((16, MAX_TILE_PX + 16, 3), 200, np.uint8)
    tifffile.imwrite(path, image, tile=(16, MAX_TILE_PX + 16), photometric="rgb", compression="zlib")
    with pytest.raises(SlideOutOfLimits) as err:
        open_slide(path, backend=backend)
    assert str(path) in str(err.value) and str(MAX_TILE_PX + 16) in str(err.value)


def test_bomb_header_is_fast(tmp_path):
    """A header claiming 10^6 x 10^6 px (15.3M tiles; tables as holes): open, integrity check and
    describe stay within seconds and one read stays small; a 65536 px tile is refused; tables
    claimed past the end are damage."""
    from sample_data.synthetic import make_bomb

    bomb = make_bomb(tmp_path / "bomb.tif")
    t0 = time.perf_counter()
    with open_slide(bomb) as s:
        ensure_intact(bomb)
        info = describe(s, resolve_mpp(s))
        elapsed = time.perf_counter() - t0
        assert info.dimensions == (10**6, 10**6) and s.backend == "tiffslide"
        import tracemalloc

        tracemalloc.start()
        try:
            region = s.read_region((500_000, 500_000), 0, (300, 300))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert region.shape == (300, 300, 3) and peak < 8 << 20
    assert elapsed < 4.0, f"open + ensure_intact + describe took {elapsed:.1f} s"
    with pytest.raises(SlideOutOfLimits, match="openslide"):  # libtiff would take minutes on the table
        open_slide(bomb, backend="openslide")

    big_tiles = make_bomb(tmp_path / "bigtiles.tif", tile=65536)
    with pytest.raises(SlideOutOfLimits, match="65536 x 65536 px tiles"):
        open_slide(big_tiles)

    cut = make_bomb(tmp_path / "cut.tif", tables="past-eof")
    t0 = time.perf_counter()
    with pytest.raises(UnreadableSlide, match="past the end of the file"):
        ensure_intact(cut)
    assert time.perf_counter() - t0 < 1.0


def test_damaged_sub_level_is_found(tmp_path):
    """Pyramid levels in SubIFDs are checked too (tifffile's pages do not list them)."""
    image = np.random.default_rng(2).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(image, tile=(256, 256), photometric="rgb", subifds=1, metadata={"PhysicalSizeX": 0.5})
        tw.write(image[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    assert tiff_damage(path) is None
    with tifffile.TiffFile(path) as tf:
        counts = tf.series[0].levels[1].pages[0].tags["TileByteCounts"]
        where, n = counts.valueoffset, counts.count
    data = bytearray(path.read_bytes())
    data[where + 4 * (n - 1):where + 4 * n] = (len(data) * 2).to_bytes(4, "little")  # last tile: 2x the file
    path.write_bytes(bytes(data))
    damage = tiff_damage(path)
    assert damage and damage.startswith("image 0, sub-image 0 has data past the end of the file"), damage


# -- DICOM -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dicom_series_dir(tmp_path_factory, sample_slide):
    from sample_data.synthetic import make_dicom_slide

    folder = tmp_path_factory.mktemp("dicom") / "case12"
    make_dicom_slide(folder, width=1536, height=1024, mpp=0.25, levels=2)
    return folder


def test_dicom_folder_opens_and_info_describes_it(dicom_series_dir):
    with open_slide(dicom_series_dir) as s:
        assert s.backend == "openslide" and s.vendor == "dicom"
        assert s.level_dimensions == ((1536, 1024), (384, 256))
        assert (resolve_mpp(s).mpp, resolve_mpp(s).source) == (pytest.approx(0.25), "metadata")
        assert s.path.parent == dicom_series_dir and s.path.name == "level0.dcm"
        pixels = s.read_region((600, 400), 0, (64, 64))
        assert 60 < pixels.mean() < 245  # H&E mosaic, neither blank glass nor black
    proc = run_cli("info", str(dicom_series_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["dimensions"] == [1536, 1024] and d["mpp"] == pytest.approx(0.25) and d["mpp_source"] == "metadata"
    assert d["path"].endswith("level0.dcm")
    # embed names the same file, so the store's slide attrs agree with info
    [job] = build_jobs([dicom_series_dir.parent])
    assert job.path.name == "level0.dcm" and job.slide_id == "case12"


def test_dicom_without_extension_and_several_series(tmp_path, dicom_series_dir):
    from sample_data.synthetic import make_dicom_slide

    folder = tmp_path / "scanner-export"
    folder.mkdir()
    for f in dicom_series_dir.iterdir():  # series 1: files named like UIDs, no .dcm
        shutil.copy(f, folder / f"1.2.826.0.1.{f.stem[-1]}")
    (folder / "README").write_text("not DICOM\n")
    (folder / "notes.txt").write_text("")
    make_dicom_slide(folder, width=512, height=512, mpp=0.5, levels=1, names="B{k}")  # series 2
    found = find_slides(tmp_path)
    assert sorted(p.name for p in found) == ["1.2.826.0.1.0", "B0"]
    ids = sorted(j.slide_id for j in build_jobs([tmp_path]))
    assert len(set(ids)) == 2 and all(i.startswith("scanner-export-") and len(i) == len("scanner-export-") + 8
                                      for i in ids)
    assert ids == sorted(j.slide_id for j in build_jobs([folder]))  # stable
    with pytest.raises(UnreadableSlide, match="holds 2 DICOM series"):
        open_slide(folder)
    with open_slide(next(p for p in found if p.name == "B0")) as s:
        assert s.dimensions == (512, 512)

    only = tmp_path / "only"
    only.mkdir()
    for f in dicom_series_dir.iterdir():
        shutil.copy(f, only / f.stem)  # level0, level1: extensionless, one series
    [job] = build_jobs([only])
    assert job.slide_id == "only" and job.path.name == "level0"
    with open_slide(only) as s:
        assert s.level_count == 2

    empty = tmp_path / "plain"
    empty.mkdir()
    (empty / "README").write_text("x")
    with pytest.raises(UnreadableSlide, match="is a directory"):
        open_slide(empty)


def test_an_imagej_calibration_is_read(tmp_path):
    """Fiji/ImageJ TIFFs keep their calibration as ``unit=um`` in the description and pixels per unit
    in X/YResolution (no TIFF resolution unit)."""
    from wsi_embed.errors import SlideOutOfLimits
    from wsi_embed.slide import imagej_mpp, open_slide, resolve_mpp

    rgb = np.full((300, 200, 3), 200, np.uint8)
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(path, rgb, imagej=True, resolution=(1 / 0.499, 1 / 0.499), metadata={"unit": "um"})
    with open_slide(path) as slide:
        info = resolve_mpp(slide)
    assert info.source == "metadata" and abs(info.mpp - 0.499) < 1e-6
    assert imagej_mpp("ImageJ=1.54f\nunit=\\u00B5m\n", 4.0, 4.0) == 0.25  # as Fiji writes µ
    assert imagej_mpp("ImageJ=1.54f\nunit=mm\n", 2000.0, 2000.0) == 0.5
    assert imagej_mpp("ImageJ=1.54f\nunit=microns\n", 2.0, 2.0) == 0.5
    assert imagej_mpp("ImageJ=1.54f\nunit=pixel\n", 1.0, 1.0) is None  # uncalibrated
    assert imagej_mpp("not ImageJ", 2.0, 2.0) is None
    oblong = tmp_path / "oblong.tif"  # pixels 0.5 x 0.6 µm: refused like any non-square calibration
    tifffile.imwrite(oblong, rgb, imagej=True, resolution=(2.0, 1 / 0.6), metadata={"unit": "um"})
    with open_slide(oblong) as slide, pytest.raises(SlideOutOfLimits, match="not square"):
        resolve_mpp(slide)
