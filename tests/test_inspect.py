"""``wsi-embed inspect STORE``: what a store holds, and its consistency check."""

from __future__ import annotations

import json
import re
import shutil

from tests.conftest import run_cli


def test_inspect_json_keys(planted_cohort):
    store = planted_cohort["out"] / "planted_001.zarr"
    done = run_cli("inspect", str(store), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert list(info) == ["slide", "grid", "tissue", "encoders", "consistency"]
    assert info["slide"]["slide_id"] == "planted_001" and info["slide"]["mpp"] == 0.5
    assert info["slide"]["mpp_source"] == "metadata"
    assert info["grid"]["patch_px"] == 224 and info["grid"]["rows"] * info["grid"]["cols"] > 0
    assert info["tissue"]["area_mm2"] > 0 and info["tissue"]["cells_embedded"] > 0
    enc = info["encoders"]
    assert isinstance(enc, list) and len(enc) == 1
    assert enc[0]["name"] == "timm:test_vit" and enc[0]["dim"] == 64 and enc[0]["dtype"] == "float16"
    assert enc[0]["weights_random"] is True and enc[0]["precision"] == "fp32" and enc[0]["decoder"]
    assert enc[0]["cells"] == info["tissue"]["cells_embedded"]
    c = info["consistency"]
    assert c["ok"] and c["finite_inside_mask"] and c["nan_outside_mask"] and c["complete"] and not c["problems"]


def test_inspect_text(planted_cohort):
    done = run_cli("inspect", str(planted_cohort["out"] / "planted_000.zarr"))
    assert done.returncode == 0, done.stderr
    for text in ("µm/px (metadata)", "cells embedded", "dim 64", "weights RANDOM", "consistency  ok"):
        assert text in done.stdout, text
    from wsi_embed import open_store

    rows, cols = open_store(planted_cohort["out"] / "planted_000.zarr").mask.shape
    assert f"grid         {cols} x {rows} cells (across x down)" in done.stdout  # as the slide's width x height
    assert re.search(r"^mpp +\d+\.\d{1,4} µm/px", done.stdout, re.M), done.stdout


def test_a_path_inside_a_store_names_the_store_to_inspect(planted_cohort):
    store = planted_cohort["out"] / "planted_000.zarr"
    done = run_cli("inspect", str(store / "mask"))
    assert done.returncode == 1 and done.stderr.strip() == (
        f"error: {store / 'mask'}: inside the store {store}, not a store itself; give the store itself: "
        f"wsi-embed inspect {store}")


def test_deleted_chunk_is_inconsistent(planted_cohort, tmp_path):
    store = tmp_path / "planted_001.zarr"
    shutil.copytree(planted_cohort["out"] / "planted_001.zarr", store)
    (store / "timm-test_vit" / "embeddings" / "c" / "0" / "0" / "0").unlink()
    done = run_cli("inspect", str(store), "--json")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    c = json.loads(done.stdout)["consistency"]
    assert c["ok"] is False and c["finite_inside_mask"] is False and c["nan_outside_mask"] is True
    assert c["complete"] is True  # the flag is set: the damage is in the chunks
    assert any("no finite embedding" in p["what"] for p in c["problems"])
    assert "--repair" in c["fix"]
    text = run_cli("inspect", str(store))
    assert text.returncode == 1 and "INCONSISTENT" in text.stdout and "Traceback" not in text.stderr


def test_not_a_store(tmp_path):
    done = run_cli("inspect", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "not a wsi-embed store" in done.stderr
    assert "Traceback" not in done.stderr


def test_lost_root_metadata_gives_the_whole_fix(planted_cohort, tmp_path):
    store = tmp_path / "planted_001.zarr"
    shutil.copytree(planted_cohort["out"] / "planted_001.zarr", store)
    (store / "zarr.json").unlink()
    done = run_cli("inspect", str(store), "--json")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    fix = json.loads(done.stdout)["consistency"]["fix"]
    assert fix.startswith("it cannot be repaired automatically (its root metadata") and fix.endswith("options)")
    assert "wsi-embed embed SLIDE --out" in fix


def test_a_group_whose_metadata_is_lost_says_so(planted_cohort, tmp_path):
    store = tmp_path / "planted_001.zarr"
    shutil.copytree(planted_cohort["out"] / "planted_001.zarr", store)
    (store / "timm-test_vit" / "zarr.json").unlink()
    text = run_cli("inspect", str(store))
    assert text.returncode == 1 and "Traceback" not in text.stderr
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("encoder"))
    assert line == "encoder      timm-test_vit: its metadata cannot be read (embeddings: dim 64, float16), INCOMPLETE"
    enc = json.loads(run_cli("inspect", str(store), "--json").stdout)["encoders"][0]
    assert enc["metadata_readable"] is False and enc["complete"] is False and enc["dim"] == 64
    from wsi_embed.verify import verify_store

    (store / "notes").mkdir()  # someone's folder put inside the store: not a group to re-embed
    (store / "notes" / "a.txt").write_text("x")
    fixes = sorted(verify_store(store).unrepairable, reverse=True)
    assert fixes == ["group timm-test_vit lost its encoder attrs (name, weights); re-embed it with wsi-embed embed "
                     f"SLIDE --out {tmp_path} --model NAME",  # a plain rerun redoes it: no --overwrite
                     f"{store / 'notes'} is not an encoder group (no zarr.json, no embeddings): a folder put inside "
                     "the store; move it out of the store"], fixes


def test_a_temporary_store_is_not_inspected_as_one(planted_cohort, tmp_path):
    import pytest

    from wsi_embed.errors import IncompleteStore
    from wsi_embed.inspect import inspect_store

    temporary = tmp_path / ".planted_000.zarr.tmp-host-1-abcdef"  # as a killed run leaves it
    shutil.copytree(planted_cohort["out"] / "planted_000.zarr", temporary)
    with pytest.raises(IncompleteStore, match="a temporary store of a run that did not finish, not a store"):
        inspect_store(temporary)
