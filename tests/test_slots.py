"""Loader workers hand patches over in reused shared slots (wsi_embed.slots), with identical pixels."""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest
import torch

from wsi_embed.grid import GridSpec, plan_grid, plan_regions
from wsi_embed import loader as loader_module
from wsi_embed.loader import BurstReader, EndOfSlide, RegionBatch, make_loader, region_task
from wsi_embed.slots import Slot, SlotPool


@pytest.fixture(scope="module")
def tasks(sample_slide):
    """The sample slide's whole grid in 2 x 2-cell regions: 35 regions, more than the pool's slots."""
    grid = plan_grid(GridSpec(), slide_mpp=0.499, level_dimensions=((2220, 2967),), level_downsamples=(1.0,))
    regions = plan_regions(grid, np.ones((grid.rows, grid.cols), bool), 2)
    return [region_task(0, str(sample_slide), "tiffslide", grid, r) for r in regions]


def _read(tasks, workers: int):
    loader = make_loader(iter([*tasks, EndOfSlide(0)]), workers=workers, pin_memory=False)
    items = [item for item in loader if not isinstance(item, EndOfSlide)]
    return loader.dataset.pool, items


def _in_pool(pool: SlotPool, patches: torch.Tensor) -> bool:
    start = pool._memory.data_ptr()
    return start <= patches.data_ptr() < start + pool.slots * pool.slot_bytes


def test_workers_send_slots_with_the_in_process_pixels_and_every_slot_comes_back(tasks):
    _, expected = _read(tasks, 0)
    pool, items = _read(tasks, 2)
    assert len(tasks) > pool.slots  # all items held at once: the pool runs dry and workers fall back
    assert [(i.region, i.count) for i in items] == [(e.region, e.count) for e in expected]
    via_slot = [_in_pool(pool, i.to_device("cpu")) for i in items]
    assert 0 < sum(via_slot) <= pool.slots and not all(via_slot)
    for item, ref in zip(items, expected):
        assert item.error is None and torch.equal(item.to_device("cpu"), ref.patches)
    free = pool.free()
    part = items[0].patches[1:]  # a view outliving its batch keeps the slot taken
    del items, item
    gc.collect()
    assert pool.free() == pool.slots - 1 > free
    del part
    assert pool.free() == pool.slots


def test_a_slot_crosses_processes_as_its_number_and_arrives_as_patches():
    pool = SlotPool(2, 4 * 8 * 8 * 3)
    slot, out = pool.take((4, 8, 8, 3))
    out[...] = np.arange(out.size, dtype=np.uint8).reshape(out.shape)
    batch = RegionBatch(0, 7, None, slot=slot)
    wire = pickle.dumps(batch)
    assert len(wire) < 1000  # no pixels in the message
    arrived = pickle.loads(wire)
    assert arrived.slot is None and arrived.count == 4 and _in_pool(pool, arrived.patches)
    assert torch.equal(arrived.patches, torch.from_numpy(out.copy()))
    assert pool.take((5, 8, 8, 3)) is None  # larger than a slot: the caller falls back
    other, _ = pool.take((1, 8, 8, 3))
    assert pool.take((1, 8, 8, 3)) is None  # none free
    pool.put_back(other)  # a read that failed returns its slot
    del arrived
    gc.collect()
    assert pool.free() == 2
    assert isinstance(slot, Slot)


def test_burst_reads_give_the_in_process_items_in_order_and_read_ahead_only_on_demand(tasks):
    feed = [*tasks[:20], EndOfSlide(0), *tasks[20:], EndOfSlide(1)]
    plain = list(make_loader(iter(feed), workers=0, pin_memory=False))
    taken = []

    def tracked():
        for task in feed:
            taken.append(task)
            yield task

    reader = make_loader(tracked(), workers=0, pin_memory=False, threads=2, burst=16)
    assert isinstance(reader, BurstReader)
    items = iter(reader)
    first = next(items)
    # 2 x 2-cell regions: one burst is the tasks covering 16 cells, read together before any is used
    assert len(taken) == 4 and first.region == plain[0].region
    burst = [first, *items]
    assert len(burst) == len(plain)
    taken.clear()
    first = next(iter(make_loader(tracked(), workers=0, pin_memory=False, threads=2, burst=10_000)))
    # a burst ends with its slide: the next slide's tasks may still be in preparation
    assert len(taken) == 21 and isinstance(taken[-1], EndOfSlide) and first.region == plain[0].region
    for item, ref in zip(burst, plain):
        if isinstance(ref, EndOfSlide):
            assert isinstance(item, EndOfSlide) and item.slide_key == ref.slide_key
        else:
            assert (item.slide_key, item.region, item.error) == (ref.slide_key, ref.region, None)
            assert torch.equal(item.patches, ref.patches)


def test_a_burst_reads_its_largest_regions_first_and_gives_them_in_task_order(monkeypatch):
    """The burst is a barrier: largest first, the threads finish it together."""
    from types import SimpleNamespace

    started = []
    monkeypatch.setattr(loader_module.RegionDataset, "__getitem__",
                        lambda self, task: started.append(task.name) or task.name)
    sizes = {"a": 2, "b": 9, "c": 1, "d": 5}
    feed = [SimpleNamespace(name=k, offsets=[(0, 0)] * n) for k, n in sizes.items()]
    assert list(BurstReader(iter(feed), threads=1, patches=100)) == ["a", "b", "c", "d"]
    assert started == ["b", "d", "a", "c"]


def test_burst_reader_closes_its_threads_slide_handles(tasks, monkeypatch):
    closed = []
    real_close = loader_module._close
    monkeypatch.setattr(loader_module, "_close", lambda handles: (closed.append(handles), real_close(handles)))
    reader = BurstReader(iter(tasks[:6]), threads=2, patches=8)
    assert len(list(reader)) == 6
    assert 1 <= len(closed) <= 2  # each thread that read opened the slide once, and closed it at the end


def test_a_pool_the_address_space_cannot_hold_leaves_the_workers_without_slots(monkeypatch, caplog):
    """128 workers under a tight overcommit limit: mmap fails (ENOMEM); it used to be a traceback."""
    from wsi_embed import loader

    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(loader, "SlotPool", no_memory)
    with caplog.at_level("WARNING"):
        assert loader._slot_pool(1032) is None
    assert any("no shared slots for 1032 regions" in r.getMessage() for r in caplog.records)
