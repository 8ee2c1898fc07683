"""Each bad input: one clear line naming the file and the fix, non-zero exit, no traceback, no store.

The per-slide failures (a missing path, not a slide, truncated, corrupt tiles, no mpp) are checked in
one CLI run over all of them plus a good slide (one start-up of the CLI instead of one per input):
each bad input must still get exactly one error line of its own, and the good slide is still embedded."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, sample_slide) -> dict:
    """One `wsi-embed embed BAD... good.svs` run. Keys: ``paths`` (kind -> input path; ``good`` last),
    ``proc`` (the completed process), ``out``."""
    import numpy as np
    import tifffile

    from sample_data.synthetic import make_slide

    root = tmp_path_factory.mktemp("bad_input")
    paths = {"missing": root / "nope.svs"}
    paths["not_a_slide"] = root / "notes.svs"
    paths["not_a_slide"].write_text("this is a text file\n")
    data = sample_slide.read_bytes()
    for cut in (0.3, 0.9):
        paths[f"truncated_{cut}"] = root / f"truncated-{int(cut * 100)}.svs"
        paths[f"truncated_{cut}"].write_bytes(data[: int(len(data) * cut)])
    # headers intact, JPEG tile data garbage: the failure comes while reading pixels, mid-run
    with tifffile.TiffFile(sample_slide) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    corrupt = bytearray(data)
    rng = np.random.default_rng(0)
    for i in range(len(offsets) // 3, 2 * len(offsets) // 3):  # the middle third of level 0
        corrupt[offsets[i] + 2 : offsets[i] + counts[i]] = rng.integers(0, 256, counts[i] - 2, dtype=np.uint8).tobytes()
    paths["corrupt"] = root / "corrupt.svs"
    paths["corrupt"].write_bytes(bytes(corrupt))
    # a lossless (LZW) pyramid: its thumbnail level intact, level-0 tiles under the tissue garbage
    rgb = tifffile.TiffFile(sample_slide).pages[0].asarray()
    lzw = root / "lossless.tif"
    with tifffile.TiffWriter(lzw) as tif:
        tif.write(rgb, tile=(256, 256), compression="lzw", subifds=1, resolution=(1e4 / 0.499, 1e4 / 0.499),
                  resolutionunit="CENTIMETER")
        tif.write(rgb[::4, ::4].copy(), tile=(256, 256), compression="lzw", subfiletype=1)
    with tifffile.TiffFile(lzw) as tf:
        offsets, counts = tf.pages[0].dataoffsets, tf.pages[0].databytecounts
    corrupt = bytearray(lzw.read_bytes())
    i = 7 * 9 + 2  # one tile (row 7, col 2 of 9) under tissue, away from what is read before the cells
    corrupt[offsets[i] + 10 : offsets[i] + counts[i]] = bytes((b * 31 + 7) & 255 for b in
                                                              corrupt[offsets[i] + 10 : offsets[i] + counts[i]])
    paths["corrupt_lzw"] = root / "corrupt-lossless.tif"
    paths["corrupt_lzw"].write_bytes(bytes(corrupt))
    # a header that claims far more pixels than its tile table holds (readers fill the rest with black)
    paths["forged"] = root / "forged.tif"
    shutil.copy(lzw, paths["forged"])
    with tifffile.TiffFile(paths["forged"], mode="r+") as tf:
        tf.pages[0].tags["ImageWidth"].overwrite(200_000)
        tf.pages[0].tags["ImageLength"].overwrite(150_000)
    lzw.unlink()
    # an OME-TIFF whose only resolution is in its OME-XML, written at the end: a cut copy loses it
    ome = root / "scan.ome.tif"
    tifffile.imwrite(ome, rgb, tile=(256, 256), compression="jpeg", photometric="rgb", ome=True,
                     metadata={"PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499})
    paths["truncated_ome"] = root / "cut.ome.tif"
    paths["truncated_ome"].write_bytes(ome.read_bytes()[: int(ome.stat().st_size * 0.9)])
    ome.unlink()
    paths["link_loop"] = root / "loop-a.svs"
    paths["link_loop"].symlink_to(root / "loop-b.svs")
    (root / "loop-b.svs").symlink_to(paths["link_loop"])
    paths["no_mpp"] = make_slide(root / "nompp.tif", width=1600, height=1200, write_mpp=False)
    paths["good"] = root / "good.svs"
    shutil.copy(sample_slide, paths["good"])
    out = root / "out"
    proc = run_cli("embed", *(str(p) for p in paths.values()), "--out", str(out), *FAST)
    return {"paths": paths, "proc": proc, "out": out}


def assert_slide_failed_cleanly(bad_run, kind, *must_contain):
    """The run failed (exit 1, no traceback); this input has exactly one error line, naming it and the
    fix; it left no store and no temporary behind."""
    proc, out, path = bad_run["proc"], bad_run["out"], bad_run["paths"][kind]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in error_lines(proc.stderr) if str(path) in line]
    assert len(lines) == 1, proc.stderr
    for text in (str(path), *must_contain):
        assert text in lines[0], lines[0]
    assert not (out / f"{path.stem}.zarr").exists() and not list(out.glob(f".{path.stem}*"))


def test_missing_path(bad_run):
    assert_slide_failed_cleanly(bad_run, "missing", "no such file")


def test_not_a_slide(bad_run):
    assert_slide_failed_cleanly(bad_run, "not_a_slide", "not a whole-slide image")


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_truncated_slide(bad_run, cut):
    assert_slide_failed_cleanly(bad_run, f"truncated_{cut}", "truncated or corrupt")


def test_a_truncated_ome_tiff_is_called_truncated_not_missing_its_resolution(bad_run):
    assert_slide_failed_cleanly(bad_run, "truncated_ome", "truncated or corrupt", "re-copy")


def test_a_symlink_loop_is_named_as_such(bad_run):
    assert_slide_failed_cleanly(bad_run, "link_loop", "symbolic link to nothing")


def test_corrupt_tiles(bad_run):
    """Headers intact, JPEG tile data garbage: the failure comes while reading pixels, mid-run."""
    assert_slide_failed_cleanly(bad_run, "corrupt", "cannot decode pixels at level 0", "re-copy or re-export it")


def test_corrupt_lossless_tiles(bad_run):
    """The codec's own error (IMCD_LZW_CORRUPT) comes with what it means and what to do."""
    assert_slide_failed_cleanly(bad_run, "corrupt_lzw", "cannot decode pixels at level 0", "re-copy or re-export it")


def test_forged_header_fails_up_front(bad_run):
    """It used to be embedded for minutes into a 'done' store of black."""
    assert_slide_failed_cleanly(bad_run, "forged", "claims 200000 x 150000 px, which needs 458252 tiles",
                                "re-copy or re-export it")


def test_slide_without_mpp(bad_run, out_dir, tmp_path):
    assert_slide_failed_cleanly(bad_run, "no_mpp", "--slide-mpp")
    path = shutil.copy(bad_run["paths"]["no_mpp"], tmp_path / "nompp.tif")
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


def test_one_bad_slide_does_not_stop_the_others(bad_run):
    proc, out, paths = bad_run["proc"], bad_run["out"], bad_run["paths"]
    assert proc.returncode == 1
    assert (out / "good.zarr").is_dir()
    assert "summary: 11 slides: 1 done, 0 skipped, 10 failed" in proc.stdout, proc.stdout
    bad = [p for kind, p in paths.items() if kind != "good"]
    lines = error_lines(proc.stderr)
    assert len(lines) == len(bad), proc.stderr  # one line per bad slide, none for the good one
    assert sorted(next(i for i, p in enumerate(bad) if str(p) in line) for line in lines) == list(range(len(bad)))
    assert str(paths["good"]) not in proc.stderr
    assert sorted(p.name for p in out.glob("*.zarr")) == ["good.zarr"] and not list(out.glob(".*"))


def test_info_on_a_store_folder_or_a_pipe_says_what_it_is(bad_run, tmp_path):
    import os

    store = next(bad_run["out"].glob("*.zarr"))
    proc = run_cli("info", str(store))
    assert_clean_failure(proc, tmp_path / "nothing-here", str(store), "wsi-embed inspect")
    pipe = tmp_path / "pipe.svs"
    os.mkfifo(pipe)  # reading it would block for ever
    proc = run_cli("info", str(pipe), timeout=60)
    assert_clean_failure(proc, tmp_path / "nothing-here", str(pipe), "not a regular file")


@pytest.mark.slow  # in -m slow: keeps CI under 15 minutes
def test_bench_takes_the_slide_mpp_its_message_asks_for(bad_run):
    path = bad_run["paths"]["no_mpp"]
    args = ("bench", str(path), "--model", "timm:test_vit", "--max-patches", "8", "--naive-patches", "0", "--json")
    proc = run_cli(*args)
    assert_clean_failure(proc, bad_run["out"] / "nothing-here", str(path), "--slide-mpp")
    proc = run_cli(*args, "--slide-mpp", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert '"patches": 8' in proc.stdout


def test_bench_over_a_folder_with_a_bad_slide_fails_after_its_figures(bad_run, tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(bad_run["paths"]["good"], folder / "good.svs")
    shutil.copy(bad_run["paths"]["not_a_slide"], folder / "junk.svs")
    proc = run_cli("bench", str(folder), "--model", "timm:test_vit", "--max-patches", "8", "--naive-patches", "0",
                   "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # the other slides' figures are still given
    assert result["slides_failed"] == 1 and result["patches"] > 0
    assert [line for line in error_lines(proc.stderr) if "junk.svs" in line]


def test_a_target_mpp_coarser_than_100_um_is_a_unit_mistake(sample_slide, tmp_path):
    """--mpp 5000 used to give a 'done' store without a cell."""
    proc = run_cli("embed", str(sample_slide), "--out", str(tmp_path / "out"), "--mpp", "5000", *FAST)
    assert_clean_failure(proc, tmp_path / "out", "--mpp 5000 µm/px is coarser than 100", "1120 mm")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["embed", "bench"])
def test_absurd_worker_counts_are_one_line_before_anything_is_made(sample_slide, tmp_path, command):
    """--workers 99999 mapped slots for every worker and died in mmap with a traceback."""
    out = tmp_path / "out" / "sub"
    args = ["--out", str(out)] if command == "embed" else ["--max-patches", "10"]
    proc = run_cli(command, str(sample_slide), *args, "--workers", "99999", *FAST[:4])
    assert_clean_failure(proc, out, "--workers must be between 0 and 128, got 99999")
    assert not (tmp_path / "out").exists()


def test_an_empty_out_and_worker_counts_below_one_are_refused(sample_slide, tmp_path):
    """--out "" (an unset $OUT) wrote into the working folder; --cluster-workers -2 waited for ever."""
    for args, needle in [(("--out", ""), "--out: is empty"),
                         (("--out", str(tmp_path / "o"), "--cluster", "local", "--cluster-workers", "-2"),
                          "--cluster-workers"),
                         (("--out", str(tmp_path / "o"), "--slurm-jobs", "0"), "--slurm-jobs")]:
        proc = run_cli("embed", str(sample_slide), *args, *FAST, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_options_that_would_be_ignored_are_refused(sample_slide, tmp_path):
    """--annotation-classes without annotations embedded every cell; --cluster-workers without --cluster
    did nothing."""
    for args, needle in [(("--annotation-classes", "tumor"), "no annotations are given"),
                         (("--cluster-workers", "3"), "--cluster-workers is for dask runs"),
                         (("--cluster", "local", "--slurm-jobs", "4", "--cluster-config", "c.yaml"),
                          "--cluster-config, --slurm-jobs: for --cluster slurm only")]:
        proc = run_cli("embed", str(sample_slide), "--out", str(tmp_path / "o"), *args, *FAST, timeout=120)
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(error_lines(proc.stderr)) == 1
    assert not (tmp_path / "o").exists()


def test_embed_of_a_pipe_is_refused_not_waited_on(tmp_path):
    import os

    pipe = tmp_path / "pipe.svs"
    os.mkfifo(pipe)  # reading it would block for ever
    proc = run_cli("embed", str(pipe), "--out", str(tmp_path / "o"), *FAST, timeout=120)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
