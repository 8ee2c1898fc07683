"""The fast path (region reads, tile-aligned blocks, workers streaming slide after slide, device-side
resize and normalize) against a simple reference: one openslide read per cell, PIL resize, CPU."""

from __future__ import annotations

import json
import time

import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from wsi_embed import EmbedOptions, SlideJob, embed_slides, open_store
from wsi_embed.encoders import load_encoder


def reference_embedding(encoder, slide_path, xy, level, read_px) -> np.ndarray:
    cfg = encoder.config
    with openslide.OpenSlide(str(slide_path)) as s:
        img = s.read_region((int(xy[0]), int(xy[1])), level, (read_px, read_px)).convert("RGB")
    if read_px != cfg.input_size:
        img = img.resize((cfg.input_size, cfg.input_size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    with torch.inference_mode():
        return encoder.module(x[None])[0].numpy()


@pytest.mark.parametrize("block", [None, 5], ids=["tile-aligned", "unaligned"])
def test_fast_path_equals_reference_across_slides(block, sample_slide, pyramid_025, painted_slide, tmp_path):
    encoder = load_encoder("timm:test_resnet", "random")
    slides = [sample_slide, pyramid_025, painted_slide[0]]
    jobs = [SlideJob(p, p.stem) for p in slides]
    opts = EmbedOptions(dtype="float32", device="cpu", precision="fp32", workers=1, block=block,
                        batch_size=24, max_patches=40)  # batches straddle regions; one loader for all
    results = list(embed_slides(jobs, tmp_path, [encoder], "random", opts))
    assert [r.status for r in results] == ["done"] * 3, [r.error for r in results]
    for path, result in zip(slides, results):
        store = open_store(result.store)
        grid = store.attrs["grid"]
        assert store.embeddings().chunks[0] == (block or grid["block"])
        emb, mask, coords = store.embeddings()[...], store.mask, store.coords
        cells = list(zip(*np.nonzero(mask)))
        picks = [cells[i] for i in np.linspace(0, len(cells) - 1, 4).astype(int)]
        refs = np.stack([reference_embedding(encoder, path, coords[r, c], grid["level"], grid["read_px"])
                         for r, c in picks])
        got = np.stack([emb[r, c] for r, c in picks])
        cos = (refs * got).sum(1) / np.linalg.norm(refs, axis=1) / np.linalg.norm(got, axis=1)
        assert cos.min() >= 0.999, (path.name, cos)
        between = min(np.linalg.norm(refs[i] - refs[j]) for i in range(4) for j in range(i))
        assert np.linalg.norm(refs - got, axis=1).max() < 0.05 * between, path.name


def test_tile_aligned_blocks_follow_the_tiles(painted_slide, tmp_path):
    """224 px cells: 8 span 7 tiles of 256 px; 15 span 14 (Aperio) tiles of 240 px."""
    from wsi_embed.grid import GridSpec, choose_block, plan_grid

    g = plan_grid(GridSpec(0.5, 224), slide_mpp=0.5, level_dimensions=((40000, 40000),), level_downsamples=(1.0,))
    assert choose_block(g, 256) == 8 and choose_block(g, 240) == 15 and choose_block(g, None) == 8
    g40 = plan_grid(GridSpec(0.5, 224), slide_mpp=0.25, level_dimensions=((40000, 40000),), level_downsamples=(1.0,))
    assert choose_block(g40, 256) * 448 * 448 * 3 * choose_block(g40, 256) <= 64 << 20  # region memory cap
    encoder = load_encoder("timm:test_vit", "random")
    (result,) = embed_slides([SlideJob(painted_slide[0], "p")], tmp_path, [encoder], "random",
                             EmbedOptions(workers=0, max_patches=2))
    store = open_store(result.store)
    assert store.attrs["grid"]["block"] == 8 and store.embeddings().chunks[:2] == (8, 8)


def test_bench_reports_every_figure(sample_slide):
    proc = run_cli("bench", str(sample_slide), "--model", "timm:test_vit", "--max-patches", "32", "--batch-size", "8",
                   "--naive-patches", "16", "--workers", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("loader_patches_per_s", "model_patches_per_s", "end_to_end_patches_per_s",
                "loader_wait_fraction", "peak_rss_mb", "naive_loader_patches_per_s", "steady_patches_per_s",
                "time_to_first_batch_s", "decode_limit_patches_per_s", "loader_over_decode_limit"):
        assert d[key] is not None and d[key] > 0 or key == "loader_wait_fraction", (key, d[key])
    assert 0 <= d["loader_wait_fraction"] <= 1 and d["patches"] == 32
    assert d["machine"]["cores"] >= 1 and d["device"] == "cpu"
    assert (d["loader_workers"], d["loader_threads"]) == (1, 0)  # as asked
    assert set(d["busy_fraction"]) == {"decode", "main_thread", "device"}
    assert all(0 <= v <= 1.01 for v in d["busy_fraction"].values()), d["busy_fraction"]


def test_loader_only_reads_with_threads_where_a_cpu_device_decodes_in_process(sample_slide):
    """The CPU device's loader is burst reads in-process; bench's loader-only measures that loader,
    and the loader comparison can ask a tree for it."""
    from benchmarks.compare_loader import probe
    from wsi_embed import bench

    tasks, _ = bench._plan([sample_slide], EmbedOptions(workers=0), 48)
    n_plain, _ = bench._loader_only(tasks, 0, torch.device("cpu"))
    n_threads, seconds = bench._loader_only(tasks, 0, torch.device("cpu"), threads=2, burst=16)
    assert n_threads == n_plain == 48 and seconds > 0
    result = probe([str(sample_slide)], 16, 2, "cpu", 1, (), threads=2)
    (slide,) = result["slides"].values()
    assert (result["workers"], result["threads"]) == (0, 2) and slide["patches"] == 16 and slide["rates"][0] > 0
    from wsi_embed.loader import cpu_cores, reading_threads

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    threads = reading_threads("cpu", 0)
    assert threads == min(cpu_cores(), torch.get_num_threads()) and reading_threads("cpu", 1) == 0
    assert reading_threads("cuda", 0) == 0
    # in-process end to end (asked or not): the same reading threads
    assert bench.loader_only_readers(cpu, 0, None) == bench.loader_only_readers(cpu, 0, 0) == (0, threads)
    assert bench.loader_only_readers(cpu, 1, None, cores=16) == (16, 0)  # workers end to end: every core
    assert bench.loader_only_readers(cpu, 1, 1) == (1, 0)
    assert bench.loader_only_readers(cuda, 16, None, cores=32) == (16, 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # e.g. a dask worker process: one core, one reading thread
        assert reading_threads("cpu", 0) == 1
    finally:
        torch.set_num_threads(before)


def test_peak_memory_sampler_sees_a_held_allocation_and_paces_itself():
    from wsi_embed.bench import PeakRss

    with PeakRss() as idle:
        time.sleep(0.5)
    started = time.perf_counter()
    with PeakRss() as busy:
        block = np.ones(300 * 2**20, dtype=np.uint8)  # touched: 300 MB resident
        time.sleep(2.0)  # longer than the sampler's paced wait (40 x a sample of ~5-20 ms)
        del block
    wall = time.perf_counter() - started
    assert busy.peak - idle.peak > 250 * 2**20
    # paced: reading PSS walks every mapping; the sampler keeps to a few % of a core (20 Hz PSS: 27%)
    assert busy.samples >= 2 and busy.sampling_s < wall / 10
    with PeakRss() as spike:
        time.sleep(0.2)
        block = np.ones(300 * 2**20, dtype=np.uint8)
        time.sleep(0.25)  # shorter than the wait between PSS readings: the RSS ticks see it
        del block
        time.sleep(0.2)
    assert spike.peak - idle.peak > 250 * 2**20
