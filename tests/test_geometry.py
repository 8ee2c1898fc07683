"""Grid geometry in physical units, checked against direct reads of the slide."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from wsi_embed.grid import GridSpec, choose_level, plan_grid, plan_regions
from wsi_embed.loader import RegionDataset, region_task
from wsi_embed.slide import open_slide, resolve_mpp


def _grid(slide, spec):
    mpp = resolve_mpp(slide).mpp
    return plan_grid(spec, slide_mpp=mpp, level_dimensions=slide.level_dimensions,
                     level_downsamples=slide.level_downsamples, bounds=slide.bounds)


def test_choose_level_never_coarser_than_target():
    ds = (1.0, 4.0, 16.0)
    assert choose_level(0.25, ds, 0.5) == 0  # level 1 would be 1.0 µm/px
    assert choose_level(0.25, ds, 1.0) == 1
    assert choose_level(0.25, ds, 3.9) == 1
    assert choose_level(0.25, ds, 4.0) == 2
    assert choose_level(0.5, ds, 0.25) == 0  # finer than the scan: level 0, upsampled


def test_field_of_view_is_exact_not_snapped():
    dims, ds = ((40000, 30000), (10000, 7500)), (1.0, 4.0)
    a = plan_grid(GridSpec(0.5, 224), slide_mpp=0.2465, level_dimensions=dims, level_downsamples=ds)
    b = plan_grid(GridSpec(0.5, 224), slide_mpp=0.25, level_dimensions=dims, level_downsamples=ds)
    assert a.read_px == round(224 * 0.5 / 0.2465) == 454
    assert b.read_px == 448
    assert a.cols == (40000 - 454) // 454 + 1


def test_sample_slide_grid(sample_slide):
    with open_slide(sample_slide) as s:
        g = _grid(s, GridSpec())
    step = 224 * 0.5 / 0.499  # the physical stride, 224.45 level-0 px; cells are not snapped to 224
    assert (g.level, g.read_px) == (0, round(step))
    assert (g.rows, g.cols) == (13, 9)
    coords = g.coords()
    assert coords.shape == (g.rows, g.cols, 2)
    assert coords[0, 0].tolist() == [0, 0] and coords[1, 2].tolist() == [round(2 * step), round(step)]
    assert coords[0, 8, 0] == round(8 * step)  # no drift: position k is round(k * step)
    assert (coords[..., 0].max() + 224 <= 2220) and (coords[..., 1].max() + 224 <= 2967)


@pytest.mark.parametrize("target_mpp, level, read_px", [(0.5, 0, 448), (1.0, 1, 224), (2.0, 1, 448), (4.0, 1, 896)])
def test_pyramid_025_levels_and_read_sizes(pyramid_025, target_mpp, level, read_px):
    with open_slide(pyramid_025, backend="openslide") as s:
        assert resolve_mpp(s).mpp == pytest.approx(0.25)
        g = _grid(s, GridSpec(target_mpp, 224))
        assert (g.level, g.read_px) == (level, read_px)
        assert g.cell_size0 == pytest.approx(224 * target_mpp / 0.25)
        coords = g.coords()
        if g.cols > 1:
            assert coords[0, 1, 0] - coords[0, 0, 0] == pytest.approx(g.cell_size0)
        # level-0 coordinates land on whole pixels of the level that is read
        assert (coords % round(g.level_downsample) == 0).all()


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_block_reads_equal_direct_cell_reads(pyramid_025, backend):
    """Patches cut from one region read equal openslide reads of each cell at its stored coords."""
    ref = openslide.OpenSlide(str(pyramid_025))
    for target in (0.5, 1.0):
        with open_slide(pyramid_025, backend=backend) as s:
            g = _grid(s, GridSpec(target, 224))
        mask = np.ones((g.rows, g.cols), bool)
        region = plan_regions(g, mask, block=3)[1]
        item = RegionDataset()[region_task(0, str(pyramid_025), backend, g, region)]
        assert item.error is None and item.patches.shape == (len(region.cells), g.read_px, g.read_px, 3)
        coords = g.coords()
        for i, (r, c) in enumerate(region.cells):
            x, y = coords[r, c]
            direct = np.asarray(ref.read_region((int(x), int(y)), g.level, (g.read_px, g.read_px)))[..., :3]
            diff = np.abs(direct.astype(int) - item.patches[i].numpy().astype(int))
            # same pixels; the two backends' JPEG decoders may differ by a grey level or two
            assert diff.mean() < (0.01 if backend == "openslide" else 2.0), (target, r, c, diff.mean())


def test_reads_outside_the_slide_are_white(sample_slide):
    with open_slide(sample_slide) as s:
        w, h = s.dimensions
        block = s.read_region((w - 10, h - 10), 0, (20, 20))
    assert block.shape == (20, 20, 3)
    assert (block[10:, :] == 255).all() and (block[:, 10:] == 255).all()
    assert (block[:10, :10] != 255).any()


def test_grid_smaller_than_one_patch():
    g = plan_grid(GridSpec(0.5, 224), slide_mpp=0.5, level_dimensions=((200, 150),), level_downsamples=(1.0,))
    assert (g.rows, g.cols) == (0, 0) and g.coords().shape == (0, 0, 2)


def test_stride_overlap():
    g = plan_grid(GridSpec(0.5, 224, 112), slide_mpp=0.5, level_dimensions=((1000, 1000),), level_downsamples=(1.0,))
    assert g.cols == (1000 - 224) // 112 + 1
    assert g.coords()[0, 1, 0] == 112


def test_pictures_paint_each_point_with_the_cell_whose_centre_is_nearest():
    from wsi_embed.grid import cells_under

    # 224 px cells every 112 px (centres 112, 224, 336): the overlaps split at their middle
    index, inside = cells_under(np.array([-1, 0, 50, 167, 169, 281, 447, 448]), np.array([0, 112, 224]), 112, 224)
    assert index.tolist() == [0, 0, 0, 0, 1, 2, 2, 2] and inside.tolist() == [False] + [True] * 6 + [False]
    index, inside = cells_under(np.array([0, 223, 224, 447, 448]), np.array([0, 224]), 224, 224)  # no overlap
    assert index.tolist() == [0, 0, 1, 1, 1] and inside.tolist() == [True] * 4 + [False]
