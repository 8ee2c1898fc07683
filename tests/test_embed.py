"""End to end: real slides in, stores out, embeddings checked against an independent computation."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import openslide
import pytest
import torch
import torchvision
from PIL import Image

from tests.conftest import run_cli
from wsi_embed import EmbedOptions, embed_slide, open_store
from wsi_embed.encoders import load_encoder

LUNIT_MEAN = [0.70322989, 0.53606487, 0.66096631]
LUNIT_STD = [0.21716536, 0.26081574, 0.20723464]


def independent_rn50(weights_file) -> torch.nn.Module:
    """The published module definition, loaded straight from the file, not through wsi_embed."""
    model = torchvision.models.resnet50()
    del model.fc
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True), strict=True)
    model.fc = torch.nn.Identity()
    return model.eval()


def independent_embedding(model, slide_path, xy, level, read_px, size=224) -> np.ndarray:
    with openslide.OpenSlide(str(slide_path)) as s:
        region = s.read_region((int(xy[0]), int(xy[1])), level, (read_px, read_px)).convert("RGB")
    if read_px != size:
        region = region.resize((size, size), Image.Resampling.BILINEAR)  # PIL's is antialiased
    x = torch.from_numpy(np.asarray(region).copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(LUNIT_MEAN)[:, None, None]) / torch.tensor(LUNIT_STD)[:, None, None]
    with torch.inference_mode():
        return model(x[None])[0].numpy()


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_cells(store, slide_path, weights_file, n=5):
    """Cosines between stored and independent embeddings at ``n`` cells.

    Random-weight networks map all patches to similar directions, so a high cosine alone could
    pass by chance: the stored-vs-independent distance must also be far below the distance
    between different cells, which a wrong offset or resize would not achieve.
    """
    grid = store.attrs["grid"]
    emb = store.embeddings("lunit-bt-rn50")[...]
    mask, coords = store.mask, store.coords
    model = independent_rn50(weights_file)
    cells = list(zip(*np.nonzero(mask)))
    picks = [cells[i] for i in np.linspace(0, len(cells) - 1, n).astype(int)]
    refs = np.stack([independent_embedding(model, slide_path, coords[r, c], grid["level"], grid["read_px"])
                     for r, c in picks])
    stored = np.stack([emb[r, c].astype(np.float32) for r, c in picks])
    error = np.linalg.norm(stored - refs, axis=1)
    between = min(np.linalg.norm(refs[i] - refs[j]) for i in range(n) for j in range(n) if i != j)
    assert error.max() < 0.05 * between, (error, between)
    return [cosine(s, r) for s, r in zip(stored, refs)]


def test_sample_slide_end_to_end_cli(sample_slide, torch_home, tmp_path):
    weights_file = torch_home / "hub" / "checkpoints" / "bt_rn50_ep200.torch"
    out = tmp_path / "out"
    proc = run_cli("embed", str(sample_slide), "--out", str(out), "--model", "lunit-bt-rn50",
                   "--weights", str(weights_file), "--dtype", "float32", "--device", "cpu",
                   "--precision", "fp32", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    store_dir = out / "CMU-1-Small-Region.zarr"
    assert str(store_dir) in proc.stdout and str(out / "CMU-1-Small-Region.qc.png") in proc.stdout
    # after the run the CLI draws the maps by default (--no-maps: test_maps.py::test_maps_off), writes
    # the run record and report.html (the planted cohort's in-process run is checked in test_maps.py)
    assert (out / "CMU-1-Small-Region.lunit-bt-rn50.map.png").is_file()
    assert (out / "runs.jsonl").is_file() and f"report: {out / 'report.html'}" in proc.stdout
    store = open_store(store_dir)
    attrs = store.attrs
    assert attrs["slide"]["mpp"] == pytest.approx(0.499) and attrs["slide"]["mpp_source"] == "metadata"
    assert attrs["slide"]["dimensions"] == [2220, 2967] and attrs["slide"]["vendor"] == "aperio"
    assert attrs["grid"]["patch_px"] == 224 and attrs["grid"]["target_mpp"] == 0.5
    mask = store.mask
    assert mask.shape == (13, 9) and 20 < mask.sum() < mask.size  # real tissue, real background
    emb = store.embeddings("lunit-bt-rn50")
    assert emb.shape == (13, 9, 2048) and emb.dtype == np.float32
    e = emb[...]
    assert np.isnan(e[~mask]).all() and np.isfinite(e[mask]).all()
    enc = store.encoder_attrs("lunit-bt-rn50")
    assert enc["mean"] == LUNIT_MEAN and enc["std"] == LUNIT_STD
    assert enc["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert enc["weights_random"] is False
    assert store.root["lunit-bt-rn50"].attrs["complete"] is True
    assert store.root["thumbnail"].shape[2] == 3 and store.root["tissue_mask"].shape == store.root["thumbnail"].shape[:2]
    fraction = store.root["tissue_fraction"][...]
    assert ((fraction >= 0.25) == mask).all()
    qc = Image.open(out / "CMU-1-Small-Region.qc.png")
    assert min(qc.size) > 500
    sims = check_cells(store, sample_slide, weights_file)
    assert min(sims) >= 0.999, sims
    feats, xy = store.bag("lunit-bt-rn50")
    assert feats.shape == (mask.sum(), 2048) and xy.shape == (mask.sum(), 2)


def test_downscaled_reads_match_independent_computation(pyramid_025, torch_home, tmp_path, monkeypatch):
    """0.25 µm/px slide at 0.5 µm/px: 448 px reads, resized to 224 on the device."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    opts = EmbedOptions(dtype="float32", device="cpu", precision="fp32", workers=1)
    result = embed_slide(pyramid_025, tmp_path, ["lunit-bt-rn50"], "auto", opts)
    assert result.status == "done", result.error
    store = open_store(result.store)
    assert store.attrs["grid"]["read_px"] == 448 and store.attrs["grid"]["level"] == 0
    assert store.encoder_attrs()["weights_source"] in ("published-cache", "weights-dir")
    sims = check_cells(store, pyramid_025, torch_home / "hub" / "checkpoints" / "bt_rn50_ep200.torch", n=4)
    assert min(sims) >= 0.999, sims


def test_tissue_where_painted_none_elsewhere(painted_slide, tmp_path):
    path, boxes = painted_slide
    result = embed_slide(path, tmp_path, ["timm:test_vit"], "random", EmbedOptions(workers=0))
    assert result.status == "done", result.error
    store = open_store(result.store)
    coords, mask = store.coords, store.mask
    fraction = store.root["tissue_fraction"][...]
    size = store.attrs["grid"]["cell_size0"]
    margin = 64  # thumbnail blur and closing act within a few thumbnail pixels of a box edge
    inside = np.zeros_like(mask)
    outside = np.ones_like(mask)
    for x0, y0, x1, y1 in boxes:
        cx, cy = coords[..., 0], coords[..., 1]
        inside |= (cx >= x0 + margin) & (cy >= y0 + margin) & (cx + size <= x1 - margin) & (cy + size <= y1 - margin)
        outside &= (cx + size <= x0 - margin) | (cx >= x1 + margin) | (cy + size <= y0 - margin) | (cy >= y1 + margin)
    assert inside.sum() >= 20 and outside.sum() >= 50
    assert mask[inside].all() and fraction[inside].min() > 0.95
    assert not mask[outside].any() and fraction[outside].max() == 0
    emb = store.embeddings()[...]
    assert np.isfinite(emb[mask]).all() and np.isnan(emb[~mask]).all()
    assert store.encoder_attrs()["weights_random"] is True


@pytest.mark.parametrize("kind", ["smaller-than-a-patch", "no-tissue"])
def test_empty_slides_give_valid_empty_stores(kind, tmp_path, sample_slide):
    from sample_data.synthetic import make_slide

    if kind == "smaller-than-a-patch":
        path = make_slide(tmp_path / "tiny.tif", width=200, height=160, mpp=0.5)
    else:
        path = make_slide(tmp_path / "glass.tif", width=2048, height=1536, mpp=0.5, tissue_boxes=[])
    # in-process, what `wsi-embed embed PATH --out OUT --model timm:test_vit --weights random --workers 0`
    # runs: the cohort run (its exit code is the CLI's) and the maps and report after it
    from wsi_embed.cohort import plan_cohort, run_cohort
    from wsi_embed.report import finish_run

    summary = run_cohort(plan_cohort([path]), tmp_path / "out", ["timm:test_vit"], "random",
                         EmbedOptions(workers=0, prepare_processes=0))
    assert summary.exit_code == 0 and summary.done == 1, [r.error for r in summary.results]
    extras = finish_run(tmp_path / "out", summary)
    assert extras.report is not None and extras.report.exists(), extras.warnings
    store = open_store(tmp_path / "out" / f"{path.stem}.zarr")
    assert store.mask.sum() == 0
    emb = store.embeddings("timm:test_vit")
    assert emb.shape[2] == store.encoder_attrs()["dim"]
    assert store.bag()[0].shape[0] == 0


def test_second_encoder_is_added_beside_the_first(sample_slide, tmp_path):
    opts = EmbedOptions(workers=0, dtype="float32")
    first = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random", opts)
    before = open_store(first.store).root["coords"][...]
    mtime = (tmp_path / "CMU-1-Small-Region.zarr" / "mask" / "zarr.json").stat().st_mtime_ns
    second = embed_slide(sample_slide, tmp_path, ["timm:test_resnet"], "random", opts)
    assert second.status == "done"
    store = open_store(second.store)
    assert sorted(store.encoders) == ["timm:test_resnet", "timm:test_vit"]
    assert (store.coords == before).all()
    assert (tmp_path / "CMU-1-Small-Region.zarr" / "mask" / "zarr.json").stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".*")) and not list((tmp_path / "CMU-1-Small-Region.zarr").glob(".*"))
    again = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random", opts)
    assert again.status == "skipped"


def test_info_json(sample_slide):
    proc = run_cli("info", str(sample_slide), "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["dimensions"] == [2220, 2967] and d["mpp"] == pytest.approx(0.499)
    assert d["mpp_source"] == "metadata" and d["objective_power"] == 20 and d["vendor"] == "aperio"
    assert d["level_downsamples"] == [1.0]
