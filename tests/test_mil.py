"""wsi_embed.mil (bag datasets, collate, patient splits) and workflows/train_abmil.py, on the planted
cohort: eight real-tissue slides, the odd ones with a planted yellow-brown region (label 1)."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sample_data.synthetic import PLANTED_BOX
from tests.conftest import ROOT
from wsi_embed import open_store
from wsi_embed.errors import EncoderMismatch, IncompleteStore, LabelsError
from wsi_embed.mil import BagDataset, collate_bags, patient_splits, read_labels


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cohort(planted_cohort) -> dict:
    return planted_cohort


@pytest.fixture(scope="module")
def ds(cohort) -> BagDataset:
    return BagDataset(cohort["out"], cohort["labels"], cohort["encoder"])


def test_bags_agree_with_their_stores(cohort, ds):
    labels = {r["slide_id"]: r["label"] for r in cohort["slides"]}
    assert len(ds) == 8 and ds.classes == ("0", "1") and ds.dim == 64
    for item in ds:
        store = open_store(cohort["out"] / f"{item['slide_id']}.zarr")
        feats, xy = store.bag(cohort["encoder"])
        n = len(feats)
        assert n > 20
        assert item["features"].dtype == torch.float32 and item["features"].shape == (n, 64)
        assert torch.equal(item["features"], torch.from_numpy(feats))
        assert item["coords"].dtype == torch.int64 and torch.equal(item["coords"], torch.from_numpy(xy))
        mpp = store.attrs["slide"]["mpp"]
        assert mpp == pytest.approx(0.5)
        assert torch.allclose(item["coords_um"], item["coords"].double() * mpp)
        rows, cols = item["grid"][:, 0].numpy(), item["grid"][:, 1].numpy()
        assert item["grid"].dtype == torch.int64 and store.mask[rows, cols].all()
        assert (store.coords[rows, cols] == xy).all()  # grid and coords name the same cells
        assert int(item["label"]) == labels[item["slide_id"]] and item["label"].dtype == torch.int64
    # the group name reads the same bags
    same = BagDataset(cohort["out"], cohort["labels"], "timm-test_vit")
    assert torch.equal(same[3]["features"], ds[3]["features"])


def test_list_of_stores(cohort, ds):
    paths = [cohort["out"] / "planted_003.zarr", cohort["out"] / "planted_000.zarr"]
    two = BagDataset(paths, cohort["labels"], cohort["encoder"])
    assert two.slide_ids == ("planted_003", "planted_000")
    assert torch.equal(two[0]["features"], ds[3]["features"])


def test_grid_mode_matches_store(cohort, ds):
    grid = BagDataset(cohort["out"], cohort["labels"], cohort["encoder"], mode="grid")
    for i in (0, 5):
        item, bag = grid[i], ds[i]
        store = open_store(cohort["out"] / f"{item['slide_id']}.zarr")
        mask = store.mask
        assert item["features"].shape == (*mask.shape, 64) and item["features"].dtype == torch.float32
        assert torch.equal(item["mask"], torch.from_numpy(mask))
        assert torch.equal(item["features"][item["mask"]], bag["features"])  # row-major, like the bag
        assert (item["features"][~item["mask"]] == 0).all()
        assert torch.equal(item["coords"], torch.from_numpy(store.coords))


def test_collate_pads_and_masks(cohort, ds):
    items = [ds[0], ds[1], ds[7]]
    lengths = [len(it["features"]) for it in items]
    assert len(set(lengths)) > 1  # bags of different sizes: padding is exercised
    batch = collate_bags(items)
    n = max(lengths)
    assert batch["features"].shape == (3, n, 64) and batch["coords"].shape == (3, n, 2)
    assert batch["mask"].dtype == torch.bool and batch["mask"].sum(1).tolist() == lengths
    assert batch["label"].tolist() == [int(it["label"]) for it in items]
    assert batch["slide_id"] == [it["slide_id"] for it in items]
    for b, it in enumerate(items):
        k = lengths[b]
        assert torch.equal(batch["features"][b, :k], it["features"])
        assert torch.equal(batch["coords"][b, :k], it["coords"])
        assert (batch["features"][b, k:] == 0).all() and not batch["mask"][b, k:].any()
    # grid mode: padded to the largest grid, each item's mask padded with False
    grid = BagDataset(cohort["out"], cohort["labels"], cohort["encoder"], mode="grid")
    g_items = [grid[0], grid[7]]
    g = collate_bags(g_items)
    rows = max(it["mask"].shape[0] for it in g_items)
    cols = max(it["mask"].shape[1] for it in g_items)
    assert g["features"].shape == (2, rows, cols, 64) and g["mask"].shape == (2, rows, cols)
    for b, it in enumerate(g_items):
        assert g["mask"][b].sum() == it["mask"].sum()
        r, c = it["mask"].shape
        assert torch.equal(g["mask"][b, :r, :c], it["mask"])


def test_seeded_sampling_is_bounded_and_reproducible(cohort, ds):
    a = BagDataset(cohort["out"], cohort["labels"], cohort["encoder"], max_instances=20, seed=7)
    b = BagDataset(cohort["out"], cohort["labels"], cohort["encoder"], max_instances=20, seed=7)
    c = BagDataset(cohort["out"], cohort["labels"], cohort["encoder"], max_instances=20, seed=8)
    full = ds[2]
    first = a[2]
    assert first["features"].shape == (20, 64) and first["grid"].shape == (20, 2)
    assert torch.equal(first["coords"], b[2]["coords"]) and torch.equal(first["coords"], a[2]["coords"])
    assert not torch.equal(first["coords"], c[2]["coords"])
    # a subset of the bag's cells, in its row-major order, rows intact
    pos = {tuple(xy): k for k, xy in enumerate(full["coords"].tolist())}
    idx = [pos[tuple(xy)] for xy in first["coords"].tolist()]
    assert idx == sorted(idx) and len(set(idx)) == 20
    assert torch.equal(first["features"], full["features"][idx])
    # epoch-independent until reseeded; the subset follows the slide, not its position
    assert torch.equal(a.subset(["planted_002"])[0]["coords"], first["coords"])
    a.seed = 8
    assert torch.equal(a[2]["coords"], c[2]["coords"])
    # a bag smaller than max_instances is whole
    big = BagDataset(cohort["out"], cohort["labels"], cohort["encoder"], max_instances=10_000)
    assert torch.equal(big[2]["features"], full["features"])


def test_dataloader_with_workers(cohort, ds):
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_bags)
    seen = {}
    for batch in loader:
        for b, sid in enumerate(batch["slide_id"]):
            seen[sid] = batch["features"][b, batch["mask"][b]]
    assert sorted(seen) == sorted(ds.slide_ids)
    for i, sid in enumerate(ds.slide_ids):
        assert torch.equal(seen[sid], ds[i]["features"])
    # spawn/forkserver workers get a pickled copy: it must be small (no arrays) and read the same
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000 and torch.equal(pickle.loads(blob)[4]["features"], ds[4]["features"])


# -- errors ----------------------------------------------------------------------------------

def test_labelled_slide_without_store(cohort, tmp_path):
    rows = [[r["slide_id"], r["label"], r["patient_id"]] for r in cohort["slides"]] + [["ghost_slide", 1, "p9"]]
    labels = write_csv(tmp_path / "labels.csv", ["slide_id", "label", "patient_id"], rows)
    with pytest.raises(IncompleteStore) as err:
        BagDataset(cohort["out"], labels, cohort["encoder"])
    msg = str(err.value)
    assert "ghost_slide" in msg and str(cohort["out"]) in msg and "wsi-embed embed" in msg and "\n" not in msg


def test_store_without_the_encoder(cohort):
    with pytest.raises(EncoderMismatch) as err:
        BagDataset(cohort["out"], cohort["labels"], "lunit-dino-vits16")
    msg = str(err.value)
    assert "lunit-dino-vits16" in msg and "timm:test_vit" in msg and "\n" not in msg


def test_mixed_dims(cohort, tmp_path):
    """Two real stores whose groups of the same encoder name hold embeddings of different dims."""
    from wsi_embed.store import StoreWriter

    out = tmp_path / "out"
    out.mkdir()
    for sid in ("planted_000", "planted_001"):
        shutil.copytree(cohort["out"] / f"{sid}.zarr", out / f"{sid}.zarr")
    store = open_store(out / "planted_001.zarr")
    mask, attrs = store.mask, store.encoder_attrs(cohort["encoder"])
    emb = np.where(mask[..., None], np.random.default_rng(0).normal(size=(*mask.shape, 32)), np.nan)
    writer = StoreWriter(out / "planted_001.zarr", append=True)
    with writer:
        writer.open_existing()
        group = writer.add_encoder(cohort["encoder"], dim=32, dtype="float16", chunk=8, attrs={**attrs, "dim": 32})
        group.write_block(0, 0, emb.astype(np.float16))
        writer.mark_complete(group)
        writer.commit()
    labels = write_csv(tmp_path / "labels.csv", ["slide_id", "label"], [["planted_000", 0], ["planted_001", 1]])
    with pytest.raises(EncoderMismatch) as err:
        BagDataset(out, labels, cohort["encoder"])
    msg = str(err.value)
    assert "dim 32" in msg and "dim 64" in msg and "planted_001" in msg and "\n" not in msg


def test_single_class_and_missing_columns(cohort, tmp_path):
    one = write_csv(tmp_path / "one.csv", ["slide_id", "label"], [[r["slide_id"], 0] for r in cohort["slides"]])
    with pytest.raises(LabelsError, match="at least two classes"):
        BagDataset(cohort["out"], one, cohort["encoder"])
    no_id = write_csv(tmp_path / "no_id.csv", ["slide", "label"], [["planted_000", 0]])
    with pytest.raises(LabelsError, match="no 'slide_id' column") as err:
        BagDataset(cohort["out"], no_id, cohort["encoder"])
    assert str(no_id) in str(err.value)
    with pytest.raises(LabelsError, match="no 'grade' column.*label_column") as err:
        BagDataset(cohort["out"], cohort["labels"], cohort["encoder"], label_column="grade")
    assert str(cohort["labels"]) in str(err.value) and "slide_id, label, patient_id" in str(err.value)
    # a named label column is read
    graded = write_csv(tmp_path / "graded.csv", ["slide_id", "grade"],
                       [[r["slide_id"], "high" if r["label"] else "low"] for r in cohort["slides"]])
    ds = BagDataset(cohort["out"], graded, cohort["encoder"], label_column="grade")
    assert ds.classes == ("high", "low") and [int(ds[i]["label"]) for i in (0, 1)] == [1, 0]


def test_too_few_patients_per_class_for_the_folds(cohort, tmp_path):
    rows = [[r["slide_id"], int(i < 2), r["slide_id"]] for i, r in enumerate(cohort["slides"])]
    skewed = write_csv(tmp_path / "skewed.csv", ["slide_id", "label", "patient_id"], rows)
    with pytest.raises(LabelsError, match="a class has only 2 patient") as err:
        patient_splits(skewed, n_folds=3)
    assert str(skewed) in str(err.value)


def test_surplus_fields_and_empty_stores(cohort, tmp_path):
    rows = [[r["slide_id"], r["label"], r["patient_id"]] for r in cohort["slides"]]
    long = tmp_path / "long.csv"
    long.write_text("slide_id,label,patient_id\n" + "".join(f"{a},{b},{c},\n" for a, b, c in rows))
    with pytest.raises(LabelsError, match=r"line 2: 1 more field") as err:
        BagDataset(cohort["out"], long, cohort["encoder"])
    assert str(long) in str(err.value)
    # a complete store without a single embedded cell (all ink, outside the annotations...) is left out
    out = tmp_path / "out"
    shutil.copytree(cohort["out"], out, ignore=shutil.ignore_patterns("*.png", "*.html", "*.jsonl", "index-*"))
    import zarr

    mask = zarr.open_array(str(out / "planted_000.zarr" / "mask"), mode="r+").with_config({"write_empty_chunks": True})
    mask[...] = False  # written as the pipeline writes geometry: every chunk kept
    ds = BagDataset(out, cohort["labels"], cohort["encoder"])
    assert ds.empty == ["planted_000"] and "planted_000" not in ds.slide_ids and len(ds) == 7


def test_errors_are_one_line_in_the_workflow(cohort, tmp_path):
    one = write_csv(tmp_path / "one.csv", ["slide_id", "label"], [[r["slide_id"], 1] for r in cohort["slides"]])
    done = subprocess.run([sys.executable, "workflows/train_abmil.py", "--stores", str(cohort["out"]),
                           "--labels", str(one), "--encoder", cohort["encoder"], "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "two classes" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, needle", [
    (("--device", "gpu"), "--device"),
    (("--workers", "-1"), "--workers must be at least 0"),
    (("--epochs", "0"), "--epochs must be at least 1"),
    (("--max-instances", "0"), "--max-instances must be at least 1"),
    (("--folds", "1"), "--folds 1"),
    (("--lr", "-1"), "--lr must be a number above 0"),
    (("--lr", "nan"), "--lr must be a number above 0"),
    (("--weight-decay", "-1"), "--weight-decay must be at least 0"),
])
def test_bad_workflow_options_are_one_line(cohort, tmp_path, args, needle):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "workflows/train_abmil.py", "--stores", str(cohort["out"]),
                           "--labels", str(cohort["labels"]), "--encoder", cohort["encoder"], "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: ") and needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing made before the options were checked


def test_numeric_labels_that_are_equal_are_one_class(cohort, tmp_path):
    """0, 0.0 and " 1" from a spreadsheet: two classes, in numeric order, whatever the hash seed."""
    rows = [[r["slide_id"], ["0", "0.0", " 1", "1.0"][i % 4]] for i, r in enumerate(cohort["slides"])]
    table = read_labels(write_csv(tmp_path / "labels.csv", ["slide_id", "label"], rows))
    assert table.classes == ("0", "1")
    assert table.labels == tuple(0 if i % 4 < 2 else 1 for i in range(len(rows)))
    text = read_labels(write_csv(tmp_path / "text.csv", ["slide_id", "label"],
                                 [[r["slide_id"], ["b", "a ", "10", "9"][i % 4]] for i, r in enumerate(cohort["slides"])]))
    assert text.classes == ("10", "9", "a", "b")  # not all numbers: as text, stripped


def test_a_patient_column_under_another_name_or_case(cohort, tmp_path):
    """Patient_ID is patient_id; 'patient' or 'case_id' alone is refused: it was ignored silently and one
    patient's slides went into two folds."""
    rows = [[r["slide_id"], i % 2, f"P{i // 2}"] for i, r in enumerate(cohort["slides"])]
    table = read_labels(write_csv(tmp_path / "case.csv", ["Slide_ID", "label", "Patient_ID"], rows))
    assert table.patients == tuple(f"P{i // 2}" for i in range(len(rows)))
    for name in ("patient", "case_id"):
        with pytest.raises(LabelsError, match=f"column '{name}' looks like a patient column.*rename it patient_id"):
            read_labels(write_csv(tmp_path / f"{name}.csv", ["slide_id", "label", name], rows))


def test_one_patient_per_class_says_folds_cannot_work(cohort, tmp_path):
    rows = [[cohort["slides"][0]["slide_id"], 0], [cohort["slides"][1]["slide_id"], 1]]
    table = read_labels(write_csv(tmp_path / "two.csv", ["slide_id", "label"], rows))
    with pytest.raises(LabelsError) as err:
        patient_splits(table, 2)
    assert "at least 2 patients per class" in str(err.value) and "use at most" not in str(err.value)


# -- patient splits --------------------------------------------------------------------------

def test_patient_splits_keep_patients_whole(cohort, ds):
    patient_of = dict(zip(ds.slide_ids, ds.patients))
    for k in (2, 4):
        folds = patient_splits(ds, k, seed=3)
        assert len(folds) == k
        tests = [set(f.test) for f in folds]
        assert set().union(*tests) == set(ds.slide_ids) and sum(map(len, tests)) == len(ds)
        owner: dict[str, int] = {}
        for f in folds:
            assert not set(f.train) & set(f.test) and set(f.train) | set(f.test) == set(ds.slide_ids)
            for sid in f.test:
                assert owner.setdefault(patient_of[sid], f.fold) == f.fold  # one patient, one fold
    # deterministic for a seed; from a CSV the same as from the dataset
    assert patient_splits(ds, 2, seed=3) == patient_splits(cohort["labels"], 2, seed=3)
    with pytest.raises(LabelsError, match="4 patients cannot fill 5 folds"):
        patient_splits(ds, 5)


def test_fold_and_split_columns_are_honoured(cohort, tmp_path):
    rows = [[r["slide_id"], r["label"], r["patient_id"], int(r["patient_id"][-1]) % 2] for r in cohort["slides"]]
    labels = write_csv(tmp_path / "folds.csv", ["slide_id", "label", "patient_id", "fold"], rows)
    folds = patient_splits(BagDataset(cohort["out"], labels, cohort["encoder"]), 5)
    assert [f.fold for f in folds] == [0, 1]
    assert set(folds[0].test) == {r[0] for r in rows if r[3] == 0}
    assert set(folds[1].train) == set(folds[0].test)
    rows[0][3] = 1  # planted_000 and planted_001 (one patient) in two folds
    bad = write_csv(tmp_path / "bad.csv", ["slide_id", "label", "patient_id", "fold"], rows)
    with pytest.raises(LabelsError, match="patient 'patient_00' is in fold"):
        patient_splits(bad)
    which = {"patient_00": "train", "patient_01": "train", "patient_02": "val", "patient_03": "test"}
    split_rows = [[r["slide_id"], r["label"], r["patient_id"], which[r["patient_id"]]] for r in cohort["slides"]]
    split_csv = write_csv(tmp_path / "split.csv", ["slide_id", "label", "patient_id", "split"], split_rows)
    (fold,) = patient_splits(split_csv)
    assert fold.train == ("planted_000", "planted_001", "planted_002", "planted_003")
    assert fold.val == ("planted_004", "planted_005") and fold.test == ("planted_006", "planted_007")
    test_only = BagDataset(cohort["out"], split_csv, cohort["encoder"], split="test")
    assert test_only.slide_ids == fold.test
    assert read_labels(split_csv).splits == tuple(r[3] for r in split_rows)


def test_workflow_out_inside_a_store_and_a_worker_error_are_one_line(cohort, tmp_path):
    base = [sys.executable, "workflows/train_abmil.py", "--labels", str(cohort["labels"]), "--encoder",
            cohort["encoder"], "--epochs", "1", "--folds", "2"]
    store = cohort["out"] / f"{cohort['slides'][0]['slide_id']}.zarr"
    inside = subprocess.run([*base, "--stores", str(cohort["out"]), "--out", str(store / "run")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert inside.returncode == 1 and f"inside the store {store}" in inside.stderr, inside.stderr
    assert not (store / "run").exists()
    copy = tmp_path / "stores"
    shutil.copytree(cohort["out"], copy)
    chunk = next(p for p in sorted((copy / store.name).rglob("*")) if p.is_file() and "embeddings/c/" in p.as_posix())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    damaged = subprocess.run([*base, "--stores", str(copy), "--out", str(tmp_path / "run"), "--workers", "1"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert damaged.returncode == 1 and damaged.stderr.startswith(f"error: {copy / store.name}"), damaged.stderr
    assert "--repair" in damaged.stderr and len(damaged.stderr.strip().splitlines()) == 1, damaged.stderr


def test_a_fold_trained_without_a_class_is_flagged_and_left_out_of_the_mean(cohort, tmp_path):
    rows = [[r["slide_id"], r["label"], "train" if r["label"] == 1 else "test"] for r in cohort["slides"]]
    rows[1][2] = "test"  # both classes held out, one trained
    labels = write_csv(tmp_path / "split.csv", ["slide_id", "label", "split"], rows)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "workflows/train_abmil.py", "--stores", str(cohort["out"]), "--labels",
                           str(labels), "--encoder", cohort["encoder"], "--epochs", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "training slides have no '0'; its score is left out of the mean" in done.stderr, done.stderr
    assert "trained without 0: not in the mean" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["folds"][0]["classes_not_trained"] == ["0"] and results["auc_mean"] is None


# -- the ABMIL recipe ------------------------------------------------------------------------

def test_train_abmil_learns_the_planted_signal(cohort, tmp_path):
    out = tmp_path / "abmil"
    done = subprocess.run([sys.executable, "workflows/train_abmil.py", "--stores", str(cohort["out"]),
                           "--labels", str(cohort["labels"]), "--encoder", cohort["encoder"], "--folds", "2",
                           "--epochs", "15", "--lr", "1e-3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])  # one JSON object, last
    assert [ln.startswith("fold ") for ln in lines[:-1]] == [True, True]
    assert json.loads((out / "results.json").read_text()) == result
    assert len(result["folds"]) == 2 and {f["n_test"] for f in result["folds"]} == {4}
    # the planted region is strongly separable: measured AUC 1.0 in every fold (2-core VM, shared)
    assert result["auc_mean"] >= 0.9 and all(f["auc"] >= 0.75 for f in result["folds"])
    for k in (0, 1):
        ckpt = torch.load(out / f"fold_{k}.pt", weights_only=False)
        assert ckpt["config"]["in_dim"] == 64 and ckpt["classes"] == ["0", "1"] and ckpt["test"]
    with (out / "predictions.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 8
    x0, y0, x1, y1 = PLANTED_BOX
    for row in cohort["slides"]:
        sid = row["slide_id"]
        store = open_store(cohort["out"] / f"{sid}.zarr")
        png = Image.open(out / "attention" / f"{sid}.attention.png")
        thumb_w = store._geometry("thumbnail").shape[1]
        assert png.format == "PNG" and png.width % thumb_w == 0 and png.width >= 768
        att = np.load(out / "attention" / f"{sid}.attention.npy")
        mask = store.mask
        assert att.shape == mask.shape and np.isfinite(att[mask]).all() and np.isnan(att[~mask]).all()
        assert att[mask].sum() == pytest.approx(1.0, abs=1e-4)
        if row["label"]:
            # attention concentrates on the planted cells (measured 0.94-0.99 of the mass, on 21-36% of cells)
            cx, cy = store.coords[..., 0] + 112, store.coords[..., 1] + 112
            planted = mask & (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            share = planted.sum() / mask.sum()
            assert att[planted].sum() > max(0.8, 2 * share)



def test_train_abmil_stays_near_chance_on_labels_unrelated_to_the_signal(cohort, tmp_path):
    """Labels given per patient, each patient holding one planted and one plain slide: nothing in the
    embeddings predicts them, and the recipe must not find something anyway."""
    rows = [[r["slide_id"], int(r["patient_id"] < "patient_02"), r["patient_id"]] for r in cohort["slides"]]
    labels = write_csv(tmp_path / "unrelated.csv", ["slide_id", "label", "patient_id"], rows)
    done = subprocess.run([sys.executable, "workflows/train_abmil.py", "--stores", str(cohort["out"]),
                           "--labels", str(labels), "--encoder", cohort["encoder"], "--folds", "2",
                           "--epochs", "15", "--lr", "1e-3", "--out", str(tmp_path / "abmil")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the planted labels reach 1.0 with the same settings; these: 0.625 for seeds 0-2 (2-core VM)
    assert result["auc_mean"] <= 0.75


@pytest.mark.slow
def test_train_abmil_on_a_real_trunk_with_standin_weights(torch_home, tmp_path):
    """The recipe on a published architecture (ViT-S/16 of lunit-dino-vits16, stand-in random weights
    under the published file name) instead of the tiny test ViT, on 16 planted slides (8 patients)."""
    import os

    from sample_data.synthetic import make_planted_cohort
    from tests.conftest import run_cli

    rows = make_planted_cohort(tmp_path / "slides", 16)
    labels = write_csv(tmp_path / "labels.csv", ["slide_id", "label", "patient_id"],
                       [[r["slide_id"], r["label"], r["patient_id"]] for r in rows])
    out = tmp_path / "out"
    env = {"TORCH_HOME": str(torch_home)}
    done = run_cli("embed", str(tmp_path / "slides"), "--out", str(out), "--model", "lunit-dino-vits16",
                   "--no-maps", env=env)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "workflows/train_abmil.py", "--stores", str(out), "--labels", str(labels),
                           "--encoder", "lunit-dino-vits16", "--folds", "2", "--epochs", "30", "--lr", "1e-3",
                           "--out", str(tmp_path / "abmil")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["auc_mean"] >= 0.9


def test_a_second_run_into_the_same_out_leaves_no_outputs_of_the_first(cohort, tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "workflows/train_abmil.py", "--stores", str(cohort["out"]), "--labels",
            str(cohort["labels"]), "--encoder", cohort["encoder"], "--out", str(out), "--epochs", "1"]
    first = subprocess.run([*base, "--folds", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.glob("fold_*.pt")) == ["fold_0.pt", "fold_1.pt", "fold_2.pt"]
    (out / "notes.txt").write_text("mine")
    second = subprocess.run([*base, "--folds", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in out.glob("fold_*.pt")) == ["fold_0.pt", "fold_1.pt"]
    results = json.loads((out / "results.json").read_text())
    held_out = {s for f in results["folds"] for s in f["test_slides"]}
    assert {p.name.split(".")[0] for p in (out / "attention").glob("*.attention.png")} == held_out
    assert (out / "notes.txt").read_text() == "mine"  # only the script's own files are replaced


# -- labels files as researchers' spreadsheets write them -------------------------------------------

@pytest.mark.parametrize("name", ["bcr_patient_barcode", "participant_id", "donor_id", "MRN", "case_barcode",
                                  "Case ID", "individual"])
def test_patient_columns_under_common_names_are_refused(cohort, tmp_path, name):
    """TCGA's bcr_patient_barcode and the like were ignored silently: one patient in two folds."""
    rows = [[r["slide_id"], i % 2, f"P{i // 2}"] for i, r in enumerate(cohort["slides"])]
    with pytest.raises(LabelsError, match=f"column '{name}' looks like a patient column"):
        read_labels(write_csv(tmp_path / "p.csv", ["slide_id", "label", name], rows))
    kept = read_labels(write_csv(tmp_path / "ok.csv", ["slide_id", "label", "stain_batch", "showcase"],
                                 [row + ["b1"] for row in rows]))
    assert len(kept.slide_ids) == len(rows)


def test_missing_label_markers_are_left_out_not_a_class(cohort, tmp_path, caplog):
    marks = ["0", "1", "NA", "0", "1", "#N/A", "nan", "1"]
    rows = [[r["slide_id"], marks[i]] for i, r in enumerate(cohort["slides"])]
    table = read_labels(write_csv(tmp_path / "na.csv", ["slide_id", "label"], rows))
    assert table.classes == ("0", "1") and len(table.slide_ids) == 5
    assert "3 slides with an empty or missing 'label'" in caplog.text


def test_fold_values_blank_numeric_and_named(cohort, tmp_path):
    """A blank fold became a fold of its own; 1 and 1.0 were two folds; the user's value was lost."""
    rows = [[r["slide_id"], r["label"], r["patient_id"], ["3", "3.0", "7", "7"][int(r["patient_id"][-1])]]
            for r in cohort["slides"]]
    folds = patient_splits(write_csv(tmp_path / "f.csv", ["slide_id", "label", "patient_id", "fold"], rows))
    assert [(f.fold, f.name, len(f.test)) for f in folds] == [(0, "3", 4), (1, "7", 4)]
    rows[-1][3] = ""
    with pytest.raises(LabelsError, match="slide 'planted_007' has no fold value; give every labelled slide one"):
        read_labels(write_csv(tmp_path / "blank.csv", ["slide_id", "label", "patient_id", "fold"], rows))


def test_a_semicolon_separated_file_says_so(cohort, tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("slide_id;label\n" + "".join(f"{r['slide_id']};{r['label']}\n" for r in cohort["slides"]))
    with pytest.raises(LabelsError, match="separated by ';', not commas; save it as a comma-separated CSV"):
        read_labels(path)


def test_two_stores_of_one_slide_id_are_refused(cohort, tmp_path):
    store = cohort["out"] / "planted_000.zarr"
    other = tmp_path / "again" / store.name
    shutil.copytree(store, other)
    with pytest.raises(LabelsError, match="slide 'planted_000' is also"):
        BagDataset([store, other], cohort["labels"], cohort["encoder"])
