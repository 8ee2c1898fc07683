"""Damage is found and healed: checksummed chunks, ``open_store(verify=True)``, ``wsi-embed verify
[--repair]``, quiet CorruptStore errors on plain reads, and the resume check on damaged metadata.

Every store is a copy of one real store of the sample slide (two encoders, random weights, small
chunks), damaged in one way each."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import ROOT, run_cli
from wsi_embed import EmbedOptions, embed_slide, open_store
from wsi_embed.errors import CorruptStore, IncompleteStore
from wsi_embed.store import completed_encoders, has_checksums, remove_stale_temporaries
from wsi_embed.verify import repair_store, verify_store

VIT, RESNET = "timm:test_vit", "timm:test_resnet"
SID = "CMU-1-Small-Region"
KINDS = ("chunk_deleted", "chunk_truncated", "metadata_deleted", "geometry_corrupted")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_slide) -> Path:
    """A clean store: block 4 gives several chunks per array; 24 of the 55 tissue cells keep it quick."""
    out = tmp_path_factory.mktemp("reference")
    result = embed_slide(sample_slide, out, [VIT, RESNET], "random", EmbedOptions(workers=0, block=4, max_patches=24))
    assert result.status == "done", result.error
    return out / f"{SID}.zarr"


def _chunk(store: Path) -> Path:
    return sorted(p for p in (store / "timm-test_vit" / "embeddings" / "c").rglob("*") if p.is_file())[0]


def damage(reference: Path, where: Path, kind: str) -> Path:
    """A copy of the reference store in ``where/<kind>/``, damaged one way."""
    store = where / kind / reference.name
    shutil.copytree(reference, store)
    if kind == "chunk_deleted":
        _chunk(store).unlink()
    elif kind == "chunk_truncated":
        chunk = _chunk(store)
        os.truncate(chunk, chunk.stat().st_size // 2)
    elif kind == "metadata_deleted":
        (store / "timm-test_vit" / "embeddings" / "zarr.json").unlink()
    elif kind == "geometry_corrupted":
        chunk = sorted(p for p in (store / "mask" / "c").rglob("*") if p.is_file())[-1]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    else:
        raise ValueError(kind)
    return store


def _files(group: Path) -> dict:
    return {str(p.relative_to(group)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(group.rglob("*"))
            if p.is_file()}


def test_every_array_has_a_checksum_and_groups_record_cells(reference):
    for node in ("mask", "tissue_fraction", "coords", "thumbnail", "tissue_mask", "timm-test_vit/embeddings"):
        assert has_checksums(zarr.open_array(str(reference / node), mode="r")), node
    store = open_store(reference, verify=True)
    n = int(store.mask.sum())
    assert n == 24 and store.root["timm-test_vit"].attrs["cells"] == n
    assert verify_store(reference).ok


def test_verify_finds_each_kind_of_damage(reference, tmp_path):
    stores = {kind: damage(reference, tmp_path, kind) for kind in KINDS}
    clean = tmp_path / "clean" / reference.name
    shutil.copytree(reference, clean)
    no_root = tmp_path / "no_root" / reference.name
    shutil.copytree(reference, no_root)
    (no_root / "zarr.json").unlink()

    # the clean store named twice, by its folder and by itself, is still one store
    proc = run_cli("verify", *(str(p.parent) for p in [*stores.values(), clean, no_root]), str(clean))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("summary: 6 stores: 1 ok, 5 damaged")
    by_store = {}
    for line in lines[:-1]:
        status, rest = line.split(maxsplit=1)
        by_store[rest.split(":")[0]] = (status, line)
    assert len(by_store) == 6
    assert by_store[str(clean)][0] == "ok"
    for kind in ("chunk_deleted", "chunk_truncated", "metadata_deleted"):
        status, line = by_store[str(stores[kind])]
        assert status == "damaged" and f"encoder {VIT}" in line and "geometry" not in line, line
        assert RESNET not in line
    assert "have no finite embedding" in by_store[str(stores["chunk_deleted"])][1]
    assert "fails its checksum" in by_store[str(stores["chunk_truncated"])][1]
    assert "zarr.json is missing" in by_store[str(stores["metadata_deleted"])][1]
    status, line = by_store[str(stores["geometry_corrupted"])]
    assert status == "damaged" and "geometry (mask: chunk" in line and "checksum" in line, line
    assert "root metadata missing" in by_store[str(no_root)][1]

    as_json = json.loads(run_cli("verify", "--json", str(stores["geometry_corrupted"])).stdout)
    assert as_json["stores"][0]["damaged"] == ["geometry"] and as_json["damaged"] == 1

    for kind, store in stores.items():  # the library says the same
        report = verify_store(store)
        assert report.geometry_damaged == (kind == "geometry_corrupted")
        assert report.damaged_encoders == ([] if kind == "geometry_corrupted" else [VIT])
        with pytest.raises(CorruptStore) as err:
            open_store(store, verify=True)
        assert str(store) in str(err.value) and f"wsi-embed verify {store} --repair" in str(err.value)
    with pytest.raises(CorruptStore, match="root metadata"):
        open_store(no_root)
    assert "root metadata" in repair_store(no_root).error  # cannot be rebuilt: the slide is unknown

    # the resume check: a group whose embeddings metadata is lost, or a store without root, is redone
    assert completed_encoders(stores["metadata_deleted"]) == [RESNET]
    assert completed_encoders(no_root) == []
    assert sorted(completed_encoders(stores["chunk_deleted"])) == [RESNET, VIT]


def test_plain_reads_raise_corrupt_store_without_asyncio_noise(reference, tmp_path):
    truncated = damage(reference, tmp_path, "chunk_truncated")
    deleted = damage(reference, tmp_path, "chunk_deleted")
    # an older store (zstd, no checksum) with one chunk per cell: a failed read leaves many chunk
    # tasks pending in zarr's event loop, which asyncio reports at exit unless the read settles them
    legacy = tmp_path / "legacy" / reference.name
    shutil.copytree(reference, legacy)
    emb = zarr.open_array(str(reference / "timm-test_vit" / "embeddings"), mode="r")[...]
    shutil.rmtree(legacy / "timm-test_vit" / "embeddings")
    arr = zarr.create_array(str(legacy / "timm-test_vit" / "embeddings"), shape=emb.shape, chunks=(1, 1, emb.shape[2]),
                            dtype=emb.dtype, fill_value=np.nan, compressors=zarr.codecs.ZstdCodec(level=0))
    arr[...] = emb
    legacy_feats, _ = open_store(legacy, verify=True).bag(VIT)  # older stores still read and verify
    np.testing.assert_array_equal(legacy_feats, open_store(reference).bag(VIT)[0])
    os.truncate(_chunk(legacy), 20)

    script = textwrap.dedent(f"""
        from wsi_embed import open_store
        from wsi_embed.errors import CorruptStore
        for path in {[str(truncated), str(deleted), str(legacy)]!r}:
            try:
                open_store(path).bag("{VIT}")
            except CorruptStore as exc:
                print("CorruptStore:", exc)
        open_store({str(legacy)!r}).embeddings("{VIT}")[...]  # uncaught: the program ends on it
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    out = proc.stdout.strip().splitlines()
    assert len(out) == 3 and all(line.startswith("CorruptStore: ") for line in out), proc.stdout + proc.stderr
    assert f"{truncated}: timm-test_vit/embeddings is damaged (a chunk fails its checksum)" in out[0]
    assert "embedded cells have no finite embedding" in out[1]
    assert "cannot be decompressed" in out[2] and f"wsi-embed verify {legacy} --repair" in out[2]
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("wsi_embed.errors.CorruptStore: ")
    assert "Task was destroyed" not in proc.stderr and "never retrieved" not in proc.stderr, proc.stderr[-3000:]


def test_repair_reembeds_only_what_is_damaged(reference, tmp_path):
    stores = {kind: damage(reference, tmp_path, kind) for kind in KINDS}
    kept = {kind: _files(s / "timm-test_resnet") for kind, s in stores.items() if kind != "geometry_corrupted"}

    proc = run_cli("verify", "--repair", *(str(s.parent) for s in stores.values()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "summary: 4 stores: 0 ok, 4 damaged, 4 repaired", proc.stdout
    for kind, store in stores.items():
        line = next(line for line in lines if str(store) in line)
        if kind == "geometry_corrupted":
            assert line == f"repaired {store}: rebuilt the store with {RESNET}, {VIT}"
        else:
            assert line == f"repaired {store}: re-embedded {VIT}"
            assert _files(store / "timm-test_resnet") == kept[kind], kind  # not touched
        repaired, ref = open_store(store, verify=True), open_store(reference)
        assert sorted(repaired.encoders) == [RESNET, VIT]
        np.testing.assert_array_equal(repaired.mask, ref.mask)
        for enc in (VIT, RESNET):
            a, b = repaired.embeddings(enc)[...].astype(np.float32), ref.embeddings(enc)[...].astype(np.float32)
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], atol=1e-3, rtol=1e-3)
        assert not [p for p in store.parent.iterdir() if p.name.startswith(".")]
        assert not list(store.glob(".*"))


def test_temporary_names_start_with_a_dot(reference, tmp_path):
    scan = tmp_path / "scan.tmp-1.zarr"  # slide scan.tmp-1.svs: a real store, not a temporary
    shutil.copytree(reference, scan)
    assert sorted(open_store(scan).encoders) == [RESNET, VIT]
    assert sorted(completed_encoders(scan)) == [RESNET, VIT]
    proc = run_cli("verify", str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.startswith(f"ok       {scan}\n"), proc.stdout + proc.stderr
    temporary = tmp_path / ".scan.zarr.tmp-host-1-abcdef"
    shutil.copytree(reference, temporary)
    with pytest.raises(IncompleteStore, match="temporary"):
        open_store(temporary)
    # a repair's backup of a damaged store is kept while its process lives; once it has died, it is
    # put back where no store took its place, and removed where one did (the repair committed)
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = tmp_path / f".scan.zarr.bad.tmp-{host}-{os.getpid()}-abcdef"
    stale = tmp_path / f".scan.zarr.bad.tmp-{host}-{dead.stdout.strip()}-abcdef"
    live.mkdir(), stale.mkdir()
    (stale / "marker").write_text("the moved-aside store")
    assert remove_stale_temporaries(tmp_path, "scan") == [temporary]
    assert live.exists() and not stale.exists() and (tmp_path / "scan.zarr" / "marker").is_file()
    stale.mkdir()
    assert remove_stale_temporaries(tmp_path, "scan") == [stale]
    assert live.exists() and not stale.exists() and (tmp_path / "scan.zarr" / "marker").is_file()


def test_verify_of_a_wrong_path_is_one_line(tmp_path):
    proc = run_cli("verify", str(tmp_path / "nowhere"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such file or directory; give an output folder or a store"


def test_a_file_or_a_path_inside_a_store_is_refused_in_one_line_and_the_store_is_left_alone(
        reference, sample_slide, tmp_path):
    """verify of a slide file printed a traceback; verify/inspect of a store's array called a healthy
    store damaged and advised `embed --out STORE --overwrite`, which wrote a run into the store."""
    out = tmp_path / "out"
    store = out / reference.name
    shutil.copytree(reference, store)
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    proc = run_cli("verify", str(sample_slide))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {sample_slide}: not a folder; give an output folder of wsi-embed embed " \
                                  "or a <slide_id>.zarr store"
    for command in ("verify", "inspect"):
        proc = run_cli(command, str(store / "mask"))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().startswith(f"error: {store / 'mask'}: inside the store {store}, not a store itself")
    for target in (store, store / "sub"):
        proc = run_cli("embed", str(sample_slide), "--out", str(target), "--model", "timm:test_vit", "--weights", "random")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and "RANDOM WEIGHTS" not in proc.stderr
        assert proc.stderr.strip().endswith(f"--out takes the folder that holds the stores (here {out})"), proc.stderr
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before and verify_store(store).ok


def test_a_whole_optional_array_deleted_is_damage_and_repair_restores_it(reference, tmp_path):
    """Ink arrays and artefact measures that the tissue attrs say were written must be there: a store
    that lost one is damaged (it used to verify ok), and the rebuild brings it back."""
    from wsi_embed.verify import repair_store

    store = tmp_path / "out" / reference.name
    shutil.copytree(reference, store)
    for name in ("ink_mask", "grey_std"):
        shutil.rmtree(store / name)
    report = verify_store(store)
    assert report.geometry_damaged
    said = " ".join(p.what for p in report.problems)
    assert said.count("missing (the store's tissue attrs say it was written)") == 2, said
    assert {p.node for p in report.problems} >= {"ink_mask", "grey_std"}
    assert repair_store(store).error is None
    assert verify_store(store).ok
    ref = zarr.open_group(reference, mode="r")
    again = zarr.open_group(store, mode="r")
    for name in ("ink_mask", "grey_std"):
        np.testing.assert_allclose(again[name][...], ref[name][...], rtol=1e-3, atol=1e-3)
