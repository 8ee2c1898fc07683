"""Device decoding (``--decode``) gives the CPU path's pixels. The device path runs here with
device="cpu" (torchvision's libjpeg-turbo in place of nvJPEG: the same code, tile streams, batched
decode and cutting), on the sample SVS (RGB-coded tiles with JPEGTables and the Adobe marker), a
YCbCr pyramid, regions not aligned to tiles, edge, partial and missing tiles; tiles the device path
does not take (other codecs, progressive JPEG, a decoder that gets colours wrong) fall back to the
CPU path, with one log line per slide."""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import pytest
import tifffile
import torch

from sample_data.synthetic import make_slide, sample_rgb, write_pyramid
from wsi_embed import decode as dec
from wsi_embed.errors import InvalidOption, WsiEmbedError
from wsi_embed.grid import GridSpec, plan_grid, plan_regions
from wsi_embed.loader import EndOfSlide, ReadTask, RegionDataset, make_loader, read_cells_native, region_task
from wsi_embed.tiles import CPU_JPEG_DECODER, TileSource, decode_jpeg_cpu

CPU = torch.device("cpu")
# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work (see decode.py)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def plan() -> dec.DecodePlan:
    return dec.device_plan(CPU)


@pytest.fixture(scope="module")
def ycbcr_slide(tmp_path_factory, sample_slide):
    """Two levels (2200 x 2100 and 550 x 525), 256 px YCbCr 4:2:0 tiles, partial edge tiles."""
    return make_slide(tmp_path_factory.mktemp("decode") / "ycbcr.tif", width=2200, height=2100, mpp=0.5)


def task_at(path, level: int, x: int, y: int, plan, *, size: int = 224, rows: int = 3, cols: int = 3,
            step: int = 224) -> ReadTask:
    """rows x cols cells from level pixel (x, y); every other column one pixel further (rounded grids)."""
    offsets = tuple((c * step + c % 2, r * step) for r in range(rows) for c in range(cols))
    return ReadTask(0, str(path), "tiffslide", level, (0, 0), (0, 0), offsets, size, 0, (x, y), plan)


def places(width: int, height: int) -> list[tuple[int, int]]:
    """Aligned, unaligned, across the right/bottom edges, before the top-left corner, outside."""
    return [(0, 0), (237, 481), (width - 300, height - 250), (-30, -20), (width + 5, 0)]


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, where) -> None:
    assert ours.shape == theirs.shape and ours.dtype == torch.uint8, where
    diff = (ours.to(torch.int16) - theirs.to(torch.int16)).abs()
    assert int(diff.max()) <= 2, (where, int(diff.max()))
    assert float(diff.float().mean(dim=(0, 1, 2)).max()) <= 0.5, where


def device_patches(source: TileSource, task: ReadTask, **kw) -> dec.Decoded:
    return dec.decode_to_device(dec.collect_raw(source, task, task.decode), CPU, **kw)


def test_modes(plan):
    assert dec.resolve_decode("cpu", CPU) == dec.CPU_PLAN
    assert dec.resolve_decode("auto", "cpu") == dec.CPU_PLAN  # auto decodes on the CPU without CUDA
    with pytest.raises(InvalidOption, match="--decode gpu needs a CUDA device"):
        dec.resolve_decode("gpu", CPU)
    with pytest.raises(InvalidOption, match="unknown --decode"):
        dec.resolve_decode("fast", CPU)
    assert plan.on_device and plan.kinds == frozenset(dec.KINDS)  # torchvision on the CPU passes both probes
    assert plan.decoder == "libjpeg-turbo (torchvision.io.decode_jpeg, cpu)"
    assert dec.device_decoder_name("cuda") == "nvjpeg (torchvision.io.decode_jpeg, cuda)"
    assert dec.CPU_PLAN.decoder == CPU_JPEG_DECODER


def test_torchvision_honours_the_adobe_marker_on_cpu(sample_slide):
    source = TileSource.open(sample_slide)
    stream = source.jpeg_stream(0, 1, 1)
    source.close()
    header = dec.jpeg_header(stream)
    assert header.adobe_transform == 0 and [c[0] for c in header.components] == [0, 1, 2]
    assert dec.stream_kind(header) == ("rgb", "")
    reference = decode_jpeg_cpu(stream)
    ours = dec.decode_streams([torch.frombuffer(bytearray(stream), dtype=torch.uint8)], CPU)[0]
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), reference)
    # without the marker the same samples read as YCbCr: the colours the check must catch
    bare = dec.decode_streams([torch.frombuffer(bytearray(stream[:2] + stream[18:]), dtype=torch.uint8)], CPU)[0]
    assert not dec.same_colours(bare.permute(1, 2, 0).numpy(), reference)


@pytest.mark.parametrize("vectorized", [False, True])
def test_sample_svs_matches_cpu_path(sample_slide, plan, vectorized):
    source = TileSource.open(sample_slide)
    lv = source.levels[0]
    for x, y in places(lv.width, lv.height):
        task = task_at(sample_slide, 0, x, y, plan)
        done = device_patches(source, task, vectorized=vectorized)
        assert done.fallback is None and done.decoder == plan.decoder
        assert_close(done.patches, read_cells_native(source, task), (x, y))
    source.close()


def test_ycbcr_pyramid_matches_cpu_path(ycbcr_slide, plan):
    source = TileSource.open(ycbcr_slide)
    assert len(source.levels) == 2 and dec.stream_kind(dec.jpeg_header(source.jpeg_stream(0, 0, 0)))[0] == "ycbcr"
    for level, size in [(0, 224), (1, 224), (1, 448)]:  # 448: cells larger than tiles, past the level
        lv = source.levels[level]
        for x, y in places(lv.width, lv.height):
            task = task_at(ycbcr_slide, level, x, y, plan, size=size, rows=2, cols=3, step=size - 3)
            for vectorized in (False, True):
                assert_close(device_patches(source, task, vectorized=vectorized).patches,
                             read_cells_native(source, task), (level, size, x, y, vectorized))
    source.close()


def test_missing_tiles_are_white(ycbcr_slide, plan):
    source = TileSource.open(ycbcr_slide)
    lv = source.levels[0]
    offsets = lv.offsets.copy()
    offsets[1, 1] = offsets[0, 2] = 0  # never written
    source.levels[0] = dataclasses.replace(lv, offsets=offsets)
    task = task_at(ycbcr_slide, 0, 200, 100, plan)
    done = device_patches(source, task)
    assert_close(done.patches, read_cells_native(source, task), "missing tiles")
    # cell 4 starts at level (425, 324); tile (1, 1) covers x, y in [256, 512)
    assert bool((done.patches[4, 0:188, 0:87] == 255).all()) and not bool((done.patches[4, 0:188, 87:] == 255).all())
    # a region whose tiles are all missing: nothing to decode, all white
    offsets[:] = 0
    white = device_patches(source, task).patches
    assert white.shape == (9, 224, 224, 3) and bool((white == 255).all())
    source.close()


def test_loader_ships_tile_streams_and_to_device_decodes(sample_slide, plan):
    """Through a real worker process: the region arrives as tile streams, the main process decodes."""
    source = TileSource.open(sample_slide)
    tasks = [task_at(sample_slide, 0, x, y, plan) for x, y in [(0, 0), (700, 900)]]
    cpu_tasks = [dataclasses.replace(t, decode=dec.CPU_PLAN) for t in tasks]
    items = [i for i in make_loader(iter([*tasks, *cpu_tasks, EndOfSlide(0)]), workers=1, pin_memory=False)
             if not isinstance(i, EndOfSlide)]
    assert [i.raw is not None for i in items] == [True, True, False, False]
    assert all(i.count == 9 and i.error is None for i in items)
    assert items[0].raw.data.numel() < 9 * 224 * 224 * 3 // 10  # streams, not pixels, crossed processes
    tally = dec.DecoderTally("CMU-1-Small-Region")
    for item, task in zip(items, tasks + cpu_tasks):
        patches = item.to_device(CPU)
        assert_close(patches, read_cells_native(source, task), task.level_xy)
        assert item.to_device(CPU) is patches and item.count == 9  # a second call is a no-op
        tally.add(item.decoder, item.count, item.fallback)
    assert tally.attrs() == {"decoder": plan.decoder, "decoders": {plan.decoder: 18, CPU_JPEG_DECODER: 18}}
    source.close()


def test_region_task_carries_the_plan(sample_slide, plan):
    grid = plan_grid(GridSpec(), slide_mpp=0.499, level_dimensions=((2220, 2967),), level_downsamples=(1.0,))
    region = plan_regions(grid, np.ones((grid.rows, grid.cols), bool), 8)[0]
    assert region_task(0, str(sample_slide), "tiffslide", grid, region).decode == dec.CPU_PLAN
    task = region_task(0, str(sample_slide), "tiffslide", grid, region, decode=plan)
    item = RegionDataset()[task]
    assert item.raw is not None and item.count == len(region.cells)
    assert_close(item.to_device(CPU), read_cells_native(TileSource.open(sample_slide), task), "region")


def test_other_codecs_take_the_cpu_path_with_one_line_per_slide(tmp_path, sample_slide, plan, caplog):
    base = sample_rgb(700, 600)
    path = write_pyramid(tmp_path / "lzw.tif", [base], tile=256, compression="lzw", photometric="rgb")
    tally = dec.DecoderTally("lzw")
    with caplog.at_level(logging.INFO, logger="wsi_embed.decode"):
        for x, y in [(0, 0), (300, 200), (-10, 500)]:
            item = RegionDataset()[task_at(path, 0, x, y, plan, rows=1, cols=2)]
            assert item.raw is None and item.patches is not None and "lzw tiles (not JPEG)" in item.fallback
            assert item.decoder == "imagecodecs lzw (tifffile, cpu)"
            tally.add(item.decoder, item.count, item.fallback)
    assert len([r for r in caplog.records if "lzw" in r.getMessage()]) == 1
    assert tally.attrs()["decoder"] == "imagecodecs lzw (tifffile, cpu)" and "fallback" in tally.attrs()


def test_progressive_jpeg_takes_the_cpu_path(tmp_path, plan):
    from PIL import Image

    image, size = sample_rgb(600, 520), 256

    def tiles():
        for y in range(0, 520, size):
            for x in range(0, 600, size):
                tile = np.full((size, size, 3), 255, np.uint8)
                part = image[y : y + size, x : x + size]
                tile[: part.shape[0], : part.shape[1]] = part
                buf = io.BytesIO()
                Image.fromarray(tile).save(buf, "JPEG", quality=90, progressive=True)
                yield buf.getvalue()

    path = tmp_path / "progressive.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(tiles(), shape=(520, 600, 3), dtype=np.uint8, tile=(size, size), compression="jpeg",
                 photometric="ycbcr", subsampling=(2, 2))
    item = RegionDataset()[task_at(path, 0, 10, 20, plan, rows=2, cols=2)]
    assert item.raw is None and item.fallback == "progressive JPEG tiles"
    assert item.decoder == CPU_JPEG_DECODER
    diff = np.abs(item.patches.numpy()[0].astype(int) - image[20:244, 10:234])
    assert diff.mean() < 3  # the CPU path decodes progressive JPEG


def test_stream_kinds():
    streams = dec.probe_streams()
    assert dec.stream_kind(dec.jpeg_header(streams["ycbcr"]))[0] == "ycbcr"
    assert dec.stream_kind(dec.jpeg_header(streams["rgb"]))[0] == "rgb"
    rgb_ids = dec._relabel_components(streams["rgb"], (82, 71, 66))
    no_marker = rgb_ids[:2] + rgb_ids[2 + 2 + int.from_bytes(rgb_ids[4:6], "big"):]  # drop APP14
    assert dec.stream_kind(dec.jpeg_header(no_marker)) == (
        None, "JPEG tiles whose colour space only their component ids suggest")
    assert dec.stream_kind(dec.jpeg_header(b"\xff\xd8\xff\xd9"))[0] is None


def _ignores_adobe(streams, device):
    """A decoder that, as some could, takes RGB-coded tiles for YCbCr."""
    stripped = []
    for s in streams:
        raw = s.numpy().tobytes()
        if raw[2:4] == b"\xff\xee":
            raw = raw[:2] + raw[2 + 2 + int.from_bytes(raw[4:6], "big"):]
        stripped.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return REAL_DECODE(stripped, device)


REAL_DECODE = dec.decode_streams


def test_a_decoder_that_gets_colours_wrong_is_not_used(sample_slide, ycbcr_slide, plan, monkeypatch):
    monkeypatch.setattr(dec, "_CHECKS", {})
    monkeypatch.setattr(dec, "decode_streams", _ignores_adobe)
    # the probe keeps RGB-coded tiles on the CPU: workers decode them as before
    checked = dec.device_plan(CPU)
    assert checked.kinds == frozenset({"ycbcr"})
    item = RegionDataset()[task_at(sample_slide, 0, 0, 0, checked)]
    assert item.raw is None and "RGB-coded" in item.fallback and item.decoder == CPU_JPEG_DECODER
    assert RegionDataset()[task_at(ycbcr_slide, 0, 0, 0, checked)].raw is not None
    # streams that reached the device anyway: the first tile's check catches it, libjpeg-turbo decodes
    source = TileSource.open(sample_slide)
    task = task_at(sample_slide, 0, 237, 481, plan)
    done = device_patches(source, task)
    assert done.decoder == CPU_JPEG_DECODER and "does not decode these tiles" in done.fallback
    assert_close(done.patches, read_cells_native(source, task), "checked")
    source.close()


def test_a_tile_no_decoder_reads_fails_the_slide(sample_slide, plan, monkeypatch):
    monkeypatch.setattr(dec, "_CHECKS", {})
    source = TileSource.open(sample_slide)
    raw = dec.collect_raw(source, task_at(sample_slide, 0, 0, 0, plan), plan)
    source.close()
    dec.decode_to_device(raw, CPU)  # the format is checked (and trusted) on an intact first tile
    raw.data[int(raw.ends[0]) + 700 : int(raw.ends[1]) - 2] = 0  # the second tile's scan is garbage
    raw.data[int(raw.ends[1]) - 300 : int(raw.ends[1])] = 0xFF
    with pytest.raises(WsiEmbedError, match=r"CMU-1-Small-Region.svs: JPEG tile \(1, 0\) of level 0 cannot be decoded"):
        dec.decode_to_device(raw, CPU)  # torchvision refuses it, and so does libjpeg-turbo on the CPU path


def test_gpu_decode_check_runs_on_cpu(tmp_path, sample_slide, capsys):
    """benchmarks/gpu_decode_check.py, small: it prints JSON with the comparison and both rates."""
    import json
    import runpy
    import sys

    from tests.conftest import ROOT

    argv = sys.argv
    sys.argv = ["gpu_decode_check.py", "--device", "cpu", "--size", "2048", "--compare-size", "1100",
                "--max-patches", "64", "--repeats", "1", "--work", str(tmp_path)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "benchmarks" / "gpu_decode_check.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adobe"]["adobe_marker_honoured"] is True and report["probe_kinds"] == ["rgb", "ycbcr"]
    for slide in report["compare"]:
        for level in slide["levels"].values():
            assert level["max_abs_diff"] <= 2 and max(level["mean_abs_diff"]) <= 0.5
            assert level["pipeline_decoder"] == ["libjpeg-turbo (torchvision.io.decode_jpeg, cpu)"]
    assert report["timing"]["patches"] == 64
    assert report["timing"]["cpu_path_patches_per_s"] > 0 and report["timing"]["device_path_patches_per_s"] > 0


def test_the_store_records_the_decoder_and_both_paths_agree(sample_slide, tmp_path, monkeypatch):
    """The whole pipeline with each decoder. No CUDA here, so the device path runs on the CPU device
    (the plan ``--decode gpu`` gets on a GPU, with device cpu): its embeddings equal the CPU path's."""
    from wsi_embed import EmbedOptions, embed_slide, open_store

    opts = EmbedOptions(workers=0, max_patches=12, dtype="float32", decode="cpu")
    stores = {}
    for path, expected in (("cpu", CPU_JPEG_DECODER), ("device", "libjpeg-turbo (torchvision.io.decode_jpeg, cpu)")):
        if path == "device":
            monkeypatch.setattr("wsi_embed.pipeline.resolve_decode", lambda mode, device: dec.device_plan(device))
        result = embed_slide(sample_slide, tmp_path / path, ["timm:test_vit"], "random", opts)
        assert result.status == "done", result.error
        stores[path] = open_store(result.store)
        attrs = stores[path].encoder_attrs()
        assert attrs["decoder"] == expected and attrs["decoders"] == {expected: 12}, attrs
    np.testing.assert_allclose(stores["device"].bag()[0], stores["cpu"].bag()[0], atol=1e-4)
