"""Rules that keep stores trustworthy: groups are only added to the same slide's store, --overwrite
replaces only what it recomputes, provenance is complete, reads agree at inexact downsamples."""

from __future__ import annotations


import numpy as np
import openslide
import pytest

from wsi_embed import EmbedOptions, embed_slide, open_store
from wsi_embed.grid import GridSpec, plan_grid
from wsi_embed.slide import open_slide, resolve_mpp

FAST = EmbedOptions(workers=0, max_patches=6)


def test_a_group_is_never_added_to_another_slides_store(sample_slide, painted_slide, tmp_path):
    first = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random", FAST, slide_id="001")
    assert first.status == "done"
    other = embed_slide(painted_slide[0], tmp_path, ["timm:test_resnet"], "random", FAST, slide_id="001")
    assert other.status == "failed" and "another file" in other.error and "--overwrite" in other.error
    assert open_store(first.store).encoders == ["timm:test_vit"]
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "001.zarr").glob(".*"))


def test_overwrite_replaces_only_the_requested_group(sample_slide, tmp_path):
    opts = EmbedOptions(workers=0, max_patches=6, dtype="float32")
    embed_slide(sample_slide, tmp_path, ["timm:test_vit", "timm:test_resnet"], "random", opts)
    store_dir = tmp_path / "CMU-1-Small-Region.zarr"
    kept = open_store(store_dir).embeddings("timm:test_resnet")[...]
    again = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random",
                        EmbedOptions(workers=0, max_patches=6, dtype="float32", overwrite=True))
    assert again.status == "done"
    store = open_store(store_dir)
    assert sorted(store.encoders) == ["timm:test_resnet", "timm:test_vit"]
    np.testing.assert_array_equal(store.embeddings("timm:test_resnet")[...], kept)
    assert not list(store_dir.glob(".*"))


def test_precision_and_weights_are_recorded(sample_slide, tmp_path):
    result = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random", FAST)
    store = open_store(result.store)
    enc = store.encoder_attrs()
    assert enc["precision"] == "fp32" and enc["dtype"] == "float16" and enc["weights_random"] is True
    # the group name in the store names its model too (it used to be reported as damaged)
    assert store.encoder_attrs("timm-test_vit") == enc
    assert np.array_equal(store.embeddings("timm-test_vit")[:], store.embeddings("timm:test_vit")[:], equal_nan=True)
    with pytest.raises(Exception, match="missing or incomplete"):
        store.embeddings("timm-other")


def test_backends_agree_at_inexact_downsamples(tmp_path, sample_slide):
    """Level downsamples like 4.0007 (sizes not divisible by 4): tiffslide and openslide read the
    same level pixels for each cell (tiffslide truncates level coordinates, openslide does not)."""
    from sample_data.synthetic import make_slide

    path = make_slide(tmp_path / "odd.tif", width=6001, height=5003, mpp=0.25)
    with open_slide(path, backend="openslide") as s:
        ds = s.level_downsamples[1]
        assert ds != 4.0
        grid = plan_grid(GridSpec(1.0, 224), slide_mpp=resolve_mpp(s).mpp, level_dimensions=s.level_dimensions,
                         level_downsamples=s.level_downsamples)
    assert grid.level == 1
    coords = grid.coords()
    ref = openslide.OpenSlide(str(path))
    with open_slide(path, backend="tiffslide") as t:
        for r, c in [(0, 1), (1, 2), (2, 3), (3, 1)]:
            x, y = (int(v) for v in coords[r, c])
            a = t.read_region((x, y), 1, (grid.read_px, grid.read_px)).astype(int)
            b = np.asarray(ref.read_region((x, y), 1, (grid.read_px, grid.read_px)))[..., :3].astype(int)
            assert np.abs(a - b).mean() < 3.0, (r, c, np.abs(a - b).mean())


def test_bad_slide_id_and_bad_manifest_are_refused_up_front(sample_slide, tmp_path):
    from tests.conftest import run_cli

    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,slide_id\n{sample_slide},a/b\n")
    proc = run_cli("embed", "--list", str(listing), "--out", str(tmp_path / "o1"), "--model", "timm:test_vit",
                   "--weights", "random", "--workers", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot name a store" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("embed", str(sample_slide), "--out", str(tmp_path / "o2"), "--manifest", str(blocker / "m.csv"),
                   "--model", "timm:test_vit", "--weights", "random", "--workers", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--manifest" in proc.stderr
    assert not list((tmp_path / "o2").glob("*.zarr"))


# -- geometry in few chunks; the region block is recorded, old layouts still read ---------------------
def _chunk_files(array_dir) -> int:
    return sum(1 for p in (array_dir / "c").rglob("*") if p.is_file())


def test_geometry_chunks_rule():
    from wsi_embed.store import GEOMETRY_CHUNK_BYTES, geometry_chunks

    assert geometry_chunks((178, 178), 1) == (178, 178)  # a 40k x 40k slide at 0.5 µm/px: one chunk
    assert geometry_chunks((178, 178, 2), 8) == (178, 178, 2)
    assert geometry_chunks((2048, 2048, 3), 1) == (2048, 2048, 3)  # the largest thumbnail
    assert geometry_chunks((0, 5), 4) == (1, 5)
    for shape, itemsize, side in (((5000, 5000), 1, 4096), ((10000, 600), 4, 2048), ((3000, 3000, 2), 8, 1024),
                                  ((4000, 4000, 3), 1, 2048)):
        chunks = geometry_chunks(shape, itemsize)
        assert chunks[:2] == tuple(min(n, side) for n in shape[:2]) and chunks[2:] == shape[2:], (shape, chunks)
        assert itemsize * np.prod(chunks) <= GEOMETRY_CHUNK_BYTES


def test_geometry_is_stored_in_one_chunk_per_array(sample_slide, tmp_path):
    import zarr

    result = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random",
                         EmbedOptions(workers=0, block=4, max_patches=12))
    assert result.status == "done", result.error
    store_dir = tmp_path / "CMU-1-Small-Region.zarr"
    for name in ("mask", "tissue_fraction", "coords", "thumbnail", "tissue_mask"):
        assert _chunk_files(store_dir / name) == 1, name
    root = zarr.open_group(str(store_dir), mode="r")
    assert root.attrs["grid"]["block"] == 4
    emb = root["timm-test_vit/embeddings"]
    assert emb.chunks[:2] == (4, 4) and _chunk_files(store_dir / "timm-test_vit" / "embeddings") > 1
    store = open_store(store_dir, verify=True)
    feats, xy = store.bag()
    assert feats.shape[0] == 12 and np.array_equal(xy, store.coords[store.mask])


def _as_old_layout(store_dir, block: int) -> None:
    """Rewrite a store's geometry as stores before issue 9 had it: mask, tissue_fraction and coords
    in chunks of the region block, the pictures in 1024 px chunks, and no ``grid.block`` attr."""
    import zarr

    from wsi_embed.store import COMPRESSORS

    root = zarr.open_group(str(store_dir), mode="r+")
    for name in ("mask", "tissue_fraction", "coords", "thumbnail", "tissue_mask"):
        old = root[name]
        data, dims = old[...], old.metadata.dimension_names
        side = block if name in ("mask", "tissue_fraction", "coords") else 1024
        del root[name]
        root.create_array(name, data=data, chunks=tuple(min(n, side) for n in data.shape[:2]) + data.shape[2:],
                          dimension_names=dims, compressors=COMPRESSORS, config={"write_empty_chunks": True})
    grid = dict(root.attrs["grid"])
    grid.pop("block")
    root.attrs["grid"] = grid


def test_stores_with_the_old_geometry_chunks_still_read_verify_and_take_new_encoders(sample_slide, tmp_path):
    result = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random",
                         EmbedOptions(workers=0, block=4, max_patches=12))
    store_dir = tmp_path / "CMU-1-Small-Region.zarr"
    _as_old_layout(store_dir, 4)
    assert _chunk_files(store_dir / "mask") > 1
    before = open_store(store_dir, verify=True).bag()
    # a second encoder reuses the geometry: its chunks follow the old mask chunks (no grid.block)
    again = embed_slide(sample_slide, tmp_path, ["timm:test_resnet"], "random",
                        EmbedOptions(workers=0, max_patches=12))
    assert again.status == "done", again.error
    store = open_store(store_dir, verify=True)
    assert sorted(store.encoders) == ["timm:test_resnet", "timm:test_vit"]
    assert store.embeddings("timm:test_resnet").chunks[:2] == (4, 4)
    feats, xy = store.bag("timm:test_vit")
    np.testing.assert_array_equal(feats, before[0])
    np.testing.assert_array_equal(xy, before[1])
    assert store.bag("timm:test_resnet")[0].shape[0] == 12 == result.cells


# -- the writer as a context manager ---------------------------------------------------------------
def _geometry(rows=3, cols=5):
    return dict(attrs={"grid": {"rows": rows, "cols": cols}}, mask=np.ones((rows, cols), bool),
                tissue_fraction=np.ones((rows, cols), np.float32), coords=np.zeros((rows, cols, 2), np.int64),
                thumbnail=np.zeros((8, 8, 3), np.uint8), tissue_mask=np.ones((8, 8), bool), chunk=2)


def _leftovers(out):
    return sorted(p.name for p in out.glob(".*"))


def test_writer_context_aborts_when_the_block_raises(tmp_path):
    import zarr

    from wsi_embed.store import StoreWriter

    final = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="boom"):
        with StoreWriter(final, append=False) as writer:
            writer.create(**_geometry())
            writer.add_encoder("timm:x", dim=4, dtype="float16", chunk=2, attrs={"name": "timm:x"})
            assert _leftovers(tmp_path)
            raise ValueError("boom")
    assert writer.state == "aborted" and not final.exists() and not _leftovers(tmp_path)
    writer.abort()  # idempotent

    # a normal exit commits what the block committed
    with StoreWriter(final, append=False) as writer:
        writer.create(**_geometry())
        group = writer.add_encoder("timm:x", dim=4, dtype="float16", chunk=2, attrs={"name": "timm:x"})
        group.write_block(0, 0, np.zeros((3, 5, 4), np.float32))
        writer.mark_complete(group)
        assert writer.commit() == final
    assert writer.state == "committed" and not _leftovers(tmp_path)
    writer.abort()  # a no-op after commit: the store stays
    assert zarr.open_group(str(final), mode="r").attrs["grid"]["block"] == 2  # recorded from chunk
    with pytest.raises(RuntimeError, match="already committed"):
        writer.commit()

    # appending: a failed block removes its temporary group only, the store is untouched
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(final, append=True) as writer:
            writer.open_existing()
            writer.add_encoder("timm:y", dim=4, dtype="float16", chunk=2, attrs={"name": "timm:y"})
            assert list(final.glob(".timm-y.tmp-*"))
            raise KeyboardInterrupt
    assert not list(final.glob(".*")) and (final / "timm-x").is_dir() and not (final / "timm-y").exists()


def test_writer_kept_open_after_a_normal_block_and_guard(tmp_path):
    from wsi_embed.store import StoreWriter

    final = tmp_path / "s.zarr"
    with StoreWriter(final, append=False) as writer:  # prepared here, committed later
        writer.create(**_geometry())
    assert writer.state == "open" and _leftovers(tmp_path)
    with pytest.raises(OSError):
        with writer.guard():
            raise OSError("disk full")
    assert writer.state == "aborted" and not _leftovers(tmp_path) and not final.exists()
    with pytest.raises(RuntimeError, match="already aborted"):
        writer.create(**_geometry())


def test_reading_commands_say_what_their_folder_is_instead(tmp_path):
    """report, export, index and MIL said "no such folder" of a file that exists, and "none of its
    0 stores" of a folder with none."""
    from wsi_embed.errors import WsiEmbedError
    from wsi_embed.report import rebuild
    from wsi_embed.search import build_index
    from wsi_embed.store import existing_output_folder

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    store = tmp_path / "out" / "s1.zarr"
    store.mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    for path, needle in [(tmp_path / "nope", "no such output folder"), (a_file, "a file, not an output folder"),
                         (store, f"one store, not an output folder; give the folder that holds the stores "
                                 f"({tmp_path / 'out'})")]:
        with pytest.raises(WsiEmbedError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            existing_output_folder(path)
    assert existing_output_folder(store, store_ok=True) == store
    with pytest.raises(WsiEmbedError, match="a file, not an output folder"):
        rebuild(a_file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WsiEmbedError, match="no \\*.zarr stores in it"):
        build_index(tmp_path / "empty", "timm:test_vit")


def test_a_dangling_link_as_out_says_where_it_points(tmp_path):
    from wsi_embed.errors import OutputNotWritable
    from wsi_embed.store import check_out_dir

    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(OutputNotWritable, match=f"{link}: a link to {tmp_path / 'gone'}, which does not exist"):
        check_out_dir(link)
