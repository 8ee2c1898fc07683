"""wsi-embed export: TRIDENT, CLAM and STAMP layouts written from the planted cohort's real stores,
read back with h5py / torch.load and by torchmil's own TRIDENT dataset class."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_embed import open_store
from wsi_embed.export import SOURCE_ATTR, target_magnification, trident_magnification

ENCODER_GROUP = "timm-test_vit"


@pytest.fixture(scope="module")
def exports(planted_cohort, tmp_path_factory) -> dict:
    """Each format exported once through the CLI (trident by the group name, the others by the model
    name). Keys: format -> (to, completed process)."""
    root = tmp_path_factory.mktemp("exports")
    out = planted_cohort["out"]
    done = {}
    for fmt, enc in (("trident", ENCODER_GROUP), ("clam", "timm:test_vit"), ("stamp", "timm:test_vit")):
        to = root / fmt
        proc = run_cli("export", str(out), "--format", fmt, "--encoder", enc, "--to", str(to))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        done[fmt] = (to, proc)
    return done


def _bags(planted_cohort) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    bags = {}
    for row in planted_cohort["slides"]:
        store = open_store(planted_cohort["out"] / f"{row['slide_id']}.zarr")
        feats, xy = store.bag("timm:test_vit")
        bags[row["slide_id"]] = (feats, xy, store.attrs)
    return bags


def test_cli_prints_one_line_per_slide_and_a_summary(exports, planted_cohort):
    to, proc = exports["trident"]
    lines = proc.stdout.strip().splitlines()
    ids = [r["slide_id"] for r in planted_cohort["slides"]]
    assert lines[:-1] == [f"exported {s} -> {to / 'features_timm-test_vit' / f'{s}.h5'}" for s in ids]
    assert lines[-1].startswith("summary: 8 slides: 8 exported, 0 skipped, 0 failed")


def test_trident_layout(exports, planted_cohort):
    to, _ = exports["trident"]
    bags = _bags(planted_cohort)
    assert sorted(p.name for p in (to / "features_timm-test_vit").iterdir()) == sorted(f"{s}.h5" for s in bags)
    for slide_id, (feats, xy, attrs) in bags.items():
        grid = attrs["grid"]
        expected = {
            "patch_size": 224, "patch_size_level0": 224, "level0_magnification": 20,
            "target_magnification": 20, "overlap": 0, "name": slide_id, "savetodir": str(to),
            "level0_width": 3072, "level0_height": 2048,
        }
        assert grid["cell_size0"] == 224 and grid["slide_mpp"] == 0.5  # the cohort these numbers hold for
        with h5py.File(to / "patches" / f"{slide_id}_patches.h5", "r") as f:
            assert set(f.keys()) == {"coords"}
            assert f["coords"].dtype == np.int64 and f["coords"].shape == (len(xy), 2)
            np.testing.assert_array_equal(f["coords"][:], xy)
            assert {k: (v.item() if hasattr(v, "item") else v) for k, v in f["coords"].attrs.items()} == expected
            assert f["coords"].chunks == (1, 2) and f["coords"].maxshape == (None, 2)  # as TRIDENT's save_h5
        with h5py.File(to / "features_timm-test_vit" / f"{slide_id}.h5", "r") as f:
            assert set(f.keys()) == {"features", "coords"}
            assert f["features"].dtype == np.float32 and f["features"].shape == (len(xy), 64)
            assert f["features"].chunks == (1, 64) and f["features"].maxshape == (None, 64)
            np.testing.assert_array_equal(f["features"][:], feats)  # the store is float16: exact in float32
            assert np.isfinite(f["features"][:]).all() and f["features"][:].std() > 0
            np.testing.assert_array_equal(f["coords"][:], xy)
            assert f["coords"].dtype == np.int64
            assert dict(f["features"].attrs) == {"name": slide_id, "encoder": "timm:test_vit",
                                                 "savetodir": str(to / "features_timm-test_vit")}
            assert f["coords"].attrs["patch_size_level0"] == 224
            assert len(f.attrs[SOURCE_ATTR]) == 64


def test_trident_magnifications_follow_trident():
    # WSI._fetch_magnification's buckets, not 10 / mpp: a 0.2465 µm/px scan is 40x, 0.5 is 20x
    assert [trident_magnification(m) for m in (0.121, 0.2465, 0.25, 0.26, 0.5, 0.504, 1.0, 2.0)] == \
        [80, 40, 40, 40, 20, 20, 10, 5]
    assert target_magnification(0.5) == 20 and target_magnification(0.25) == 40
    assert target_magnification(1.0) == 10 and target_magnification(2.0) == 5


def test_clam_layout(exports, planted_cohort):
    import torch

    to, _ = exports["clam"]
    for slide_id, (feats, xy, _) in _bags(planted_cohort).items():
        with h5py.File(to / "h5_files" / f"{slide_id}.h5", "r") as f:
            assert set(f.keys()) == {"features", "coords"}
            assert f["features"].dtype == np.float32 and f["features"].shape == (len(xy), 64)
            assert f["coords"].dtype == np.int32 and f["coords"].shape == (len(xy), 2)
            assert f["features"].chunks == (32, 64) and f["coords"].chunks == (32, 2)  # CLAM's save_hdf5
            assert not f["features"].attrs and not f["coords"].attrs
            np.testing.assert_array_equal(f["features"][:], feats)
            np.testing.assert_array_equal(f["coords"][:], xy)
        pt = torch.load(to / "pt_files" / f"{slide_id}.pt")  # as CLAM's dataset_generic loads it
        assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and pt.shape == (len(xy), 64)
        np.testing.assert_array_equal(pt.numpy(), feats)


def test_stamp_layout(exports, planted_cohort):
    to, _ = exports["stamp"]
    assert sorted(p.name for p in to.iterdir()) == sorted(f"{r['slide_id']}.h5" for r in planted_cohort["slides"])
    for slide_id, (feats, xy, attrs) in _bags(planted_cohort).items():
        with h5py.File(to / f"{slide_id}.h5", "r") as f:
            assert set(f.keys()) == {"feats", "coords"}
            assert f["feats"].dtype == np.float16 and f["feats"].shape == (len(xy), 64)
            np.testing.assert_allclose(f["feats"][:].astype(np.float32), feats, rtol=1e-3, atol=1e-3)
            assert f["coords"].dtype == np.float32 and f["coords"].shape == (len(xy), 2)
            np.testing.assert_allclose(f["coords"][:], xy * 0.5)  # µm at 0.5 µm/px
            assert f["coords"][:].max() > 100  # not level-0 px mislabelled, not cell indices
            assert f.attrs["unit"] == "um" and f.attrs["feat_type"] == "tile"
            assert f.attrs["tile_size_um"] == pytest.approx(112.0) and f.attrs["tile_size_px"] == 224
            assert f.attrs["extractor"] == "timm:test_vit"
            assert "stamp_version" not in f.attrs  # STAMP refuses files from a "newer" STAMP
            assert not f["feats"].attrs and not f["coords"].attrs  # STAMP's attrs sit on the file


def test_torchmil_loads_trident_export(exports, planted_cohort):
    """torchmil's own TRIDENT dataset class (PyPI torchmil) reads the export as it reads TRIDENT's."""
    from torchmil.datasets import TridentWSIDataset

    to, _ = exports["trident"]
    ds = TridentWSIDataset(base_path=f"{to}/", labels_path=str(planted_cohort["labels"]),
                           feature_extractor=ENCODER_GROUP, patch_size=224,
                           bag_keys=["X", "Y", "adj", "coords"],  # no patch labels: leave out y_inst
                           wsi_name_col="slide_id", wsi_label_col="label")
    labels = {r["slide_id"]: r["label"] for r in planted_cohort["slides"]}
    bags = _bags(planted_cohort)
    assert sorted(ds.bag_names) == sorted(labels)
    for i, name in enumerate(ds.bag_names):
        bag = ds[i]
        feats, xy, _ = bags[name]
        np.testing.assert_array_equal(bag["X"].numpy(), feats)
        assert int(bag["Y"].reshape(-1)[0]) == labels[name]
        np.testing.assert_array_equal(bag["coords"].numpy(), xy // 224)  # grid cells, as torchmil makes them
        adj = bag["adj"].coalesce()
        assert adj.shape == (len(xy), len(xy)) and adj.indices().shape[1] >= len(xy)  # neighbours found


def _copy_cohort(planted_cohort, dest: Path, n: int = 3) -> Path:
    dest.mkdir()
    for row in planted_cohort["slides"][:n]:
        name = f"{row['slide_id']}.zarr"
        shutil.copytree(planted_cohort["out"] / name, dest / name)
    return dest


def test_resume_skips_current_files_and_cleans_stale_temporaries(planted_cohort, tmp_path):
    out = _copy_cohort(planted_cohort, tmp_path / "out")
    to = tmp_path / "to"
    args = ("export", str(out), "--format", "trident", "--encoder", "timm:test_vit", "--to", str(to))
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    feats_dir = to / "features_timm-test_vit"
    # a temporary of an export that was killed (its pid no longer runs) and one of a live export
    host = socket.gethostname()
    dead = feats_dir / f".planted_000.h5.tmp-{host}-{2**22 + 12345}-abcdef"
    live = feats_dir / f".planted_001.h5.tmp-{host}-{os.getpid()}-abcdef"
    for p in (dead, live):
        p.write_bytes(b"half a file")
    kept = {p: p.stat().st_mtime_ns for p in feats_dir.glob("*.h5")}

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    lines = second.stdout.strip().splitlines()
    assert [l.split(":")[0] for l in lines[:-1]] == [f"skipped planted_00{i}" for i in range(3)]
    assert "up to date at" in lines[0]
    assert lines[-1].startswith("summary: 3 slides: 0 exported, 3 skipped, 0 failed")
    assert {p: p.stat().st_mtime_ns for p in feats_dir.glob("*.h5")} == kept  # nothing rewritten
    assert not dead.exists() and live.exists()  # a running export's temporary is left alone
    live.unlink()

    # a truncated file and a missing one are written again; the current one is not
    (feats_dir / "planted_000.h5").write_bytes(b"\x89HDF\r\n")
    (feats_dir / "planted_001.h5").unlink()
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    assert [l.split(" ")[0] for l in third.stdout.splitlines()[:3]] == ["exported", "exported", "skipped"]
    with h5py.File(feats_dir / "planted_000.h5", "r") as f:
        assert f["features"].shape[1] == 64
    assert not [p for p in to.rglob("*") if ".tmp-" in p.name]


def test_a_reembedded_store_is_exported_again(planted_cohort, tmp_path):
    """A file is current only for the store it came from: another store under the same id (e.g.
    re-embedded with other options) is exported again, and the file follows the new store."""
    out = _copy_cohort(planted_cohort, tmp_path / "out", n=2)
    to = tmp_path / "to"
    args = ("export", str(out), "--format", "stamp", "--encoder", "timm:test_vit", "--to", str(to))
    assert run_cli(*args).returncode == 0
    # planted_000's store replaced by planted_001's under the old name: other tissue, other attrs
    shutil.rmtree(out / "planted_000.zarr")
    shutil.copytree(planted_cohort["out"] / "planted_001.zarr", out / "planted_000.zarr")
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[:2] == [f"exported planted_000 -> {to / 'planted_000.h5'}",
                                             f"skipped planted_001: up to date at {to / 'planted_001.h5'}"]
    with h5py.File(to / "planted_000.h5", "r") as a, h5py.File(to / "planted_001.h5", "r") as b:
        np.testing.assert_array_equal(a["feats"][:], b["feats"][:])


def test_an_incomplete_store_among_good_ones(planted_cohort, tmp_path):
    out = _copy_cohort(planted_cohort, tmp_path / "out")
    meta = out / "planted_001.zarr" / ENCODER_GROUP / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False  # as an interrupted embed leaves its group
    meta.write_text(json.dumps(doc))
    to = tmp_path / "to"
    proc = run_cli("export", str(out), "--format", "clam", "--encoder", "timm:test_vit", "--to", str(to))
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"exported planted_000 -> {to / 'h5_files' / 'planted_000.h5'}"
    assert lines[1].startswith("error: ") and "planted_001.zarr" in lines[1] and "incomplete" in lines[1]
    assert "rerun wsi-embed embed" in lines[1]
    assert lines[2].startswith("exported planted_002")
    assert lines[3].startswith("summary: 3 slides: 2 exported, 0 skipped, 1 failed")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in (to / "h5_files").iterdir()) == ["planted_000.h5", "planted_002.h5"]
    assert sorted(p.name for p in (to / "pt_files").iterdir()) == ["planted_000.pt", "planted_002.pt"]


@pytest.mark.parametrize("node", ["coords", "mask"])
def test_a_lost_geometry_chunk_fails_that_slide_instead_of_exporting_fill_values(planted_cohort, tmp_path, node):
    """zarr reads a missing chunk as its fill value (coords 0, 0; no cells): export must refuse it."""
    out = _copy_cohort(planted_cohort, tmp_path / "out")
    chunks = [p for p in (out / "planted_001.zarr" / node / "c").rglob("*") if p.is_file()]
    assert chunks
    chunks[0].unlink()
    to = tmp_path / "to"
    proc = run_cli("export", str(out), "--format", "trident", "--encoder", "timm:test_vit", "--to", str(to))
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("error: ")]
    assert len(failed) == 1 and "planted_001.zarr" in failed[0] and f"({node}: " in failed[0] and "chunk files are missing" in failed[0]
    assert "wsi-embed verify" in failed[0] and "--repair" in failed[0]
    assert not list(to.rglob("planted_001*"))
    assert sorted(p.name for p in (to / "features_timm-test_vit").iterdir()) == ["planted_000.h5", "planted_002.h5"]


@pytest.mark.parametrize("case", ["format", "encoder", "out"])
def test_bad_options_fail_with_one_line(planted_cohort, tmp_path, case):
    out, fmt, enc = str(planted_cohort["out"]), "trident", "timm:test_vit"
    if case == "format":
        fmt = "cellprofiler"
    elif case == "encoder":
        enc = "lunit-bt-rn50"
    else:
        out = str(tmp_path / "nowhere")
    proc = run_cli("export", out, "--format", fmt, "--encoder", enc, "--to", str(tmp_path / "to"))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in proc.stderr
    expected = {"format": ("cellprofiler", "trident, clam, stamp"),
                "encoder": ("lunit-bt-rn50", "timm:test_vit"),
                "out": ("nowhere", "no such output folder", "--out folder of wsi-embed embed")}[case]
    assert all(word in err[0] for word in expected), err[0]
    assert not (tmp_path / "to").exists() or not any((tmp_path / "to").rglob("*.h5"))


def test_a_slide_without_embedded_cells(sample_slide, tmp_path):
    """TRIDENT writes empty (0, D) datasets for a slide without patches; STAMP writes no file."""
    from PIL import Image

    from wsi_embed import EmbedOptions, embed_slide
    from wsi_embed.export import export

    empty = tmp_path / "empty.png"
    Image.new("L", (222, 297), 0).save(empty)  # the sample slide's aspect ratio, no tissue
    out = tmp_path / "out"
    result = embed_slide(sample_slide, out, ["timm:test_vit"], "random",
                         EmbedOptions(workers=0, tissue_mask=str(empty), qc=False), slide_id="planted_000")
    assert result.status == "done" and result.cells == 0, result.error
    store = out / "planted_000.zarr"
    assert open_store(store).bag("timm:test_vit")[0].shape == (0, 64)
    trident = export(out, format="trident", encoder="timm:test_vit", to=tmp_path / "trident")
    assert [r.status for r in trident.results] == ["exported"] and trident.exit_code == 0
    with h5py.File(tmp_path / "trident" / "features_timm-test_vit" / "planted_000.h5", "r") as f:
        assert f["features"].shape == (0, 64) and f["features"].dtype == np.float32
        assert f["coords"].shape == (0, 2) and f["coords"].attrs["patch_size"] == 224
    stamp = export(out, format="stamp", encoder="timm:test_vit", to=tmp_path / "stamp")
    assert [r.line() for r in stamp.results] == [
        "skipped planted_000: no embedded cells; this format has no file for it"]
    assert stamp.exit_code == 0 and not list((tmp_path / "stamp").iterdir())
