"""Each bad input: one clear line naming the file and the fix, non-zero exit, no traceback, no store."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import run_cli

FAST = ("--model", "timm:test_vit", "--weights", "random", "--workers", "0")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_clean_failure(proc, out_dir, *must_contain):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for text in must_contain:
        assert text in lines[0], lines[0]
    leftovers = list(out_dir.glob("*.zarr")) + list(out_dir.glob(".*")) if out_dir.exists() else []
    assert leftovers == [], leftovers


@pytest.fixture()
def out_dir(tmp_path):
    return tmp_path / "out"


def test_missing_path(out_dir, tmp_path):
    missing = tmp_path / "nope.svs"
    proc = run_cli("embed", str(missing), "--out", str(out_dir), *FAST)
    assert_clean_failure(proc, out_dir, str(missing), "no such file")


def test_not_a_slide(out_dir, tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is a text file\n")
    proc = run_cli("embed", str(path), "--out", str(out_dir), *FAST)
    assert_clean_failure(proc, out_dir, str(path), "not a whole-slide image")


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_slide(out_dir, tmp_path, sample_slide, cut):
    data = sample_slide.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: int(len(data) * cut)])
    proc = run_cli("embed", str(path), "--out", str(out_dir), *FAST)
    assert_clean_failure(proc, out_dir, str(path), "truncated or corrupt")


def test_corrupt_tiles(out_dir, tmp_path, sample_slide):
    """Headers intact, JPEG tile data garbage: the failure comes while reading pixels, mid-run."""
    import numpy as np
    import tifffile

    with tifffile.TiffFile(sample_slide) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    data = bytearray(sample_slide.read_bytes())
    rng = np.random.default_rng(0)
    for i in range(len(offsets) // 3, 2 * len(offsets) // 3):  # the middle third of level 0
        data[offsets[i] + 2 : offsets[i] + counts[i]] = rng.integers(0, 256, counts[i] - 2, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.svs"
    path.write_bytes(bytes(data))
    proc = run_cli("embed", str(path), "--out", str(out_dir), *FAST)
    assert_clean_failure(proc, out_dir, str(path), "corrupt")


def test_slide_without_mpp(out_dir, tmp_path, sample_slide):
    from sample_data.synthetic import make_slide

    path = make_slide(tmp_path / "nompp.tif", width=1600, height=1200, write_mpp=False)
    proc = run_cli("embed", str(path), "--out", str(out_dir), *FAST)
    assert_clean_failure(proc, out_dir, str(path), "--slide-mpp")
    proc = run_cli("embed", str(path), "--out", str(out_dir), "--slide-mpp", "0.5", *FAST)
    assert proc.returncode == 0, proc.stderr
    from wsi_embed import open_store

    store = open_store(out_dir / "nompp.zarr")
    assert store.attrs["slide"]["mpp_source"] == "override" and store.attrs["slide"]["mpp"] == 0.5


def test_output_directory_not_writable(tmp_path, sample_slide):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out_dir = blocker / "out"  # a directory cannot be made inside a file, even by root
    proc = run_cli("embed", str(sample_slide), "--out", str(out_dir), *FAST)
    assert_clean_failure(proc, tmp_path / "nothing-here", str(out_dir), "--out")


def test_one_bad_slide_does_not_stop_the_others(out_dir, tmp_path, sample_slide):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00" + bytes(100))
    good = tmp_path / "good.svs"
    shutil.copy(sample_slide, good)
    proc = run_cli("embed", str(bad), str(good), "--out", str(out_dir), *FAST)
    assert proc.returncode == 1
    assert (out_dir / "good.zarr").is_dir() and not (out_dir / "bad.zarr").exists()
    assert len(error_lines(proc.stderr)) == 1 and str(bad) in proc.stderr
