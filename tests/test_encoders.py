"""Encoders: registry, exact architectures, and offline weight resolution.

Published files cannot be downloaded here, so seeded stand-ins with the exact
published module definitions (tests/weights_helpers.py) play their part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from tests.weights_helpers import PUBLISHED_FILES, write_published_standins
from wsi_embed.encoders import fetch, get_config, list_configs, load_encoder, models_table
from wsi_embed.encoders.build import build_module
from wsi_embed.encoders.weights import resolve
from wsi_embed.errors import InvalidOption, UnknownModel, WeightsMismatch, WeightsUnavailable

NAMED = [c.name for c in list_configs()]
LUNIT = list(PUBLISHED_FILES)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
REAL_CHECK_REACHABLE = fetch.check_reachable  # before the autouse fixture disables it


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> dict[str, Path]:
    return write_published_standins(tmp_path_factory.mktemp("published"))


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Empty caches, no weights dir, and a network that must not be used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(fetch.WEIGHTS_DIR_ENV, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(url, timeout=fetch.CHECK_TIMEOUT_S):
        raise fetch.Unreachable("test: network disabled")

    def no_download(*args, **kwargs):
        raise AssertionError("tests never download")

    monkeypatch.setattr(fetch, "check_reachable", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


def hub_checkpoints() -> Path:
    path = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def link(src: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (name or src.name)
    dst.symlink_to(src)
    return dst


def assert_loaded(module: torch.nn.Module, path: Path) -> None:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    got = module.state_dict()
    assert set(got) == set(saved)
    for key, value in saved.items():
        assert torch.equal(got[key], value), key


# --- registry and architectures ----------------------------------------------------


@pytest.mark.parametrize("name", NAMED + ["timm:test_vit", "timm:resnet18"])
def test_random_build_gives_dim(name, caplog):
    with caplog.at_level(logging.WARNING, logger="wsi_embed"):
        enc = load_encoder(name, "random")
    cfg = enc.config
    assert enc.weights.random and enc.weights.source == "random" and enc.weights.sha256 is None
    assert "meaningless" in caplog.text
    assert not enc.module.training
    assert not any(p.requires_grad for p in enc.module.parameters())
    # Global average pooling makes the width independent of the input size, so the
    # convnets get a small image (4x faster on CPU); ViTs need their own size.
    size = 64 if cfg.pooling == "gap" else cfg.input_size
    with torch.no_grad():
        out = enc.module(torch.randn(1, 3, size, size))
    assert out.shape == (1, cfg.dim)
    assert torch.isfinite(out).all()
    attrs = json.loads(json.dumps(enc.attrs()))
    assert attrs["weights_random"] is True and attrs["dim"] == cfg.dim and attrs["name"] == name


def test_random_is_reproducible():
    a = load_encoder("timm:test_vit", "random").module.state_dict()
    b = load_encoder("timm:test_vit", "random").module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def meta_state_dict(name: str) -> dict:
    from wsi_embed.encoders.build import build_module

    with torch.device("meta"):  # shapes and names only
        return build_module(get_config(name)).state_dict()


def test_state_dict_keys_match_published_definitions():
    rn = meta_state_dict("lunit-bt-rn50")
    assert list(rn)[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert not any(k.startswith("fc.") for k in rn) and "layer4.2.bn3.running_var" in rn
    vit = meta_state_dict("lunit-dino-vits16")
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= set(vit)
    assert not any(k.startswith("head") for k in vit)
    assert vit["pos_embed"].shape == (1, 197, 384)
    vit8 = meta_state_dict("lunit-dino-vits8")
    assert vit8["pos_embed"].shape == (1, 785, 384)


def test_vit_returns_normed_cls_and_resnet_gap():
    vit = load_encoder("lunit-dino-vits16", "random").module
    rn = load_encoder("lunit-bt-rn50", "random").module
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(vit(x), vit.forward_features(x)[:, 0], atol=1e-6)
        x = x[..., :96, :96]
        fmap = rn.layer4(rn.layer3(rn.layer2(rn.layer1(rn.maxpool(rn.relu(rn.bn1(rn.conv1(x))))))))
        assert torch.allclose(rn(x), fmap.mean(dim=(2, 3)), atol=1e-5)


def test_normalization_constants():
    import timm
    import torchvision

    for name in LUNIT:
        cfg = get_config(name)
        assert cfg.mean == LUNIT_MEAN and cfg.std == LUNIT_STD
        assert cfg.input_size == 224 and "non-commercial" in cfg.licence
        assert cfg.weights_url == (
            "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/"
            f"pretrained-weights/{PUBLISHED_FILES[name]}"
        )
    rn = get_config("imagenet-rn50")
    tv = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert rn.mean == (0.485, 0.456, 0.406) and rn.std == (0.229, 0.224, 0.225)
    assert list(rn.mean) == tv.transforms().mean and list(rn.std) == tv.transforms().std
    assert rn.weights_url == tv.url and rn.weights_file == tv.url.rsplit("/", 1)[-1]
    vit = get_config("imagenet-vits16")
    pcfg = timm.models.get_pretrained_cfg("vit_small_patch16_224.augreg_in21k_ft_in1k")
    assert vit.mean == pcfg.mean and vit.std == pcfg.std and vit.input_size == pcfg.input_size[-1]
    t = get_config("timm:test_vit")
    assert (t.input_size, t.dim, t.mean, t.pooling) == (160, 64, (0.5, 0.5, 0.5), "timm-default")
    for cfg in list_configs():
        json.dumps(cfg.to_dict())


def test_unknown_model_messages():
    with pytest.raises(UnknownModel) as e:
        get_config("lunit-nope")
    msg = str(e.value)
    assert "'lunit-nope'" in msg and "lunit-dino-vits16" in msg and "timm:<name>" in msg
    assert "wsi-embed models" in msg
    with pytest.raises(UnknownModel, match="no_such_timm_model"):
        get_config("timm:no_such_timm_model")
    with pytest.raises(UnknownModel, match="unsupported timm model name"):
        get_config("timm:hf-hub:timm/resnet18.a1_in1k")  # would fetch a config over the network


# --- published files through `auto` -----------------------------------------------


@pytest.mark.parametrize("name", LUNIT)
def test_auto_loads_hub_cache_offline(name, standins):
    cached = link(standins[name], hub_checkpoints())
    enc = load_encoder(name)
    assert enc.weights.source == "published-cache" and enc.weights.path == str(cached)
    assert enc.weights.url == get_config(name).weights_url and not enc.weights.random
    assert_loaded(enc.module, standins[name])


def test_sha256_recorded(standins):
    link(standins["lunit-dino-vits16"], hub_checkpoints())
    enc = load_encoder("lunit-dino-vits16")
    assert enc.weights.sha256 == hashlib.sha256(standins["lunit-dino-vits16"].read_bytes()).hexdigest()
    assert enc.attrs()["weights_sha256"] == enc.weights.sha256


def test_weights_dir_comes_first(tmp_path, monkeypatch, standins):
    wdir = tmp_path / "weights"
    link(standins["lunit-bt-rn50"], wdir)
    # A different file under the same name in the hub cache must lose.
    link(standins["lunit-mocov2-rn50"], hub_checkpoints(), PUBLISHED_FILES["lunit-bt-rn50"])
    monkeypatch.setenv(fetch.WEIGHTS_DIR_ENV, str(wdir))
    enc = load_encoder("lunit-bt-rn50")
    assert enc.weights.source == "weights-dir"
    assert_loaded(enc.module, standins["lunit-bt-rn50"])


def test_offline_error_is_fast_and_says_what_to_do():
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as e:
        load_encoder("lunit-dino-vits8")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    cfg = get_config("lunit-dino-vits8")
    assert cfg.weights_url in msg
    assert str(hub_checkpoints() / cfg.weights_file) in msg
    assert "--weights PATH" in msg and "--weights random" in msg and "WSI_EMBED_WEIGHTS_DIR" in msg
    assert "\n" not in msg


def test_real_reachability_check_fails_fast():
    start = time.monotonic()
    with pytest.raises(fetch.Unreachable):  # .invalid never resolves (RFC 2606)
        REAL_CHECK_REACHABLE("https://weights.invalid/x.torch", timeout=2)
    assert time.monotonic() - start < 5


def test_download_goes_to_hub_cache(monkeypatch, standins):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst))
        Path(dst).write_bytes(standins["lunit-swav-rn50"].read_bytes())

    monkeypatch.setattr(fetch, "check_reachable", lambda url, timeout=5: None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    enc = load_encoder("lunit-swav-rn50")
    cfg = get_config("lunit-swav-rn50")
    assert calls == [(cfg.weights_url, str(hub_checkpoints() / cfg.weights_file))]
    assert enc.weights.source == "download"
    assert_loaded(enc.module, standins["lunit-swav-rn50"])


def test_imagenet_rn50_published_file_drops_fc(tmp_path):
    import torchvision

    full = torchvision.models.resnet50()
    path = hub_checkpoints() / get_config("imagenet-rn50").weights_file
    torch.save(full.state_dict(), path)
    enc = load_encoder("imagenet-rn50")
    assert enc.weights.source == "published-cache"
    assert torch.equal(enc.module.conv1.weight, full.conv1.weight)
    assert not hasattr(enc.module, "fc")


# --- explicit files, wrong files ----------------------------------------------------


def test_vit_file_into_resnet_names_the_fitting_model(standins):
    with pytest.raises(WeightsMismatch) as e:
        load_encoder("lunit-bt-rn50", str(standins["lunit-dino-vits16"]))
    msg = str(e.value)
    assert str(standins["lunit-dino-vits16"]) in msg
    assert "missing keys" in msg and "conv1.weight" in msg
    assert "unexpected keys" in msg and "cls_token" in msg
    assert "lunit-dino-vits16" in msg and "--model lunit-dino-vits16" in msg


def test_patch8_file_into_patch16_reports_shapes(standins):
    with pytest.raises(WeightsMismatch) as e:
        load_encoder("lunit-dino-vits16", str(standins["lunit-dino-vits8"]))
    msg = str(e.value)
    assert "shape mismatches" in msg and "pos_embed" in msg and "--model lunit-dino-vits8" in msg


def test_unrelated_file_matches_nothing(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsMismatch, match="no registered model matches"):
        load_encoder("lunit-bt-rn50", str(path))


def test_wrapped_and_prefixed_checkpoints_load(tmp_path):
    module = load_encoder("timm:test_vit", "random").module
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    dino = tmp_path / "dino.pth"
    import argparse

    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.last_layer.weight": torch.zeros(2)},
                "args": argparse.Namespace(arch="vit_small", lr=0.0005), "epoch": 100}, dino)  # as DINO saves it
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, ddp)
    for path in (dino, ddp):
        enc = load_encoder("timm:test_vit", str(path))
        assert enc.weights.source == "file" and enc.weights.path == str(path)
        assert all(torch.equal(enc.module.state_dict()[k], v) for k, v in sd.items())


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InvalidOption, match="not found: .*nope.pth"):  # exit 1: a path mistake, not exit 3
        load_encoder("lunit-bt-rn50", str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatch, match="cannot read .*junk.pth"):
        load_encoder("lunit-bt-rn50", str(junk))
    with pytest.raises(InvalidOption):
        load_encoder("lunit-bt-rn50", " ")


def test_url_spec_offline_names_url_and_cache():
    from wsi_embed.encoders.fetch import url_cache_path

    url = "https://example.invalid/some/weights-v1.pth"
    with pytest.raises(WeightsUnavailable) as e:
        load_encoder("lunit-bt-rn50", url)
    assert url in str(e.value) and str(url_cache_path(url)) in str(e.value)
    assert url_cache_path(url).parent.parent.parent == hub_checkpoints()


def test_two_urls_of_one_file_name_never_stand_for_each_other(tmp_path):
    """exp1/checkpoint.pth cached, exp2/checkpoint.pth asked: the cached file is not taken for it,
    nor for a published file of the same name."""
    from wsi_embed.encoders.fetch import url_cache_path
    from wsi_embed.resume import expected_weights

    exp1, exp2 = "https://lab.invalid/exp1/checkpoint.pth", "https://lab.invalid/exp2/checkpoint.pth"
    assert url_cache_path(exp1) != url_cache_path(exp2) and url_cache_path(exp1).name == "checkpoint.pth"
    cached = url_cache_path(exp1)
    cached.parent.mkdir(parents=True)
    torch.save(build_module(get_config("timm:test_vit")).state_dict(), cached)
    _, info = resolve(get_config("timm:test_vit"), exp1)
    assert (info.source, info.path, info.url) == ("url", str(cached), exp1)
    with pytest.raises(WeightsUnavailable, match="exp2/checkpoint.pth"):
        resolve(get_config("timm:test_vit"), exp2)
    assert expected_weights("timm:test_vit", exp2).sha256 is None
    assert expected_weights("timm:test_vit", exp1).sha256 == info.sha256
    lunit = get_config("lunit-bt-rn50")
    (hub_checkpoints() / lunit.weights_file).unlink(missing_ok=True)
    other = f"https://lab.invalid/finetuned/{lunit.weights_file}"  # a published file's name
    url_cache_path(other).parent.mkdir(parents=True)
    url_cache_path(other).write_bytes(b"not the published file")
    with pytest.raises(WeightsUnavailable):
        resolve(lunit, "auto")  # the published file is not there: a URL's copy does not stand for it


# --- timm-hosted weights ------------------------------------------------------------


def fake_hf_cache(repo: str, state_dict: dict) -> Path:
    from huggingface_hub import constants
    from safetensors.torch import save_file

    root = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, snap / "model.safetensors")
    return snap / "model.safetensors"


def test_timm_auto_uses_hf_cache_offline():
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        full = timm.create_model("test_vit", pretrained=False)  # with its 1000-class head
    path = fake_hf_cache("timm/test_vit.r160_in1k", full.state_dict())
    assert [r["cached"] for r in models_table() if r["name"] == "imagenet-vits16"] == [False]
    enc = load_encoder("timm:test_vit")
    assert enc.weights.source == "timm-pretrained" and enc.weights.path == str(path)
    assert enc.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(enc.module.cls_token, full.cls_token)
    assert torch.equal(enc.module.blocks[0].attn.qkv.weight, full.blocks[0].attn.qkv.weight)


def test_timm_cached_file_is_loaded_strictly():
    fake_hf_cache("timm/test_vit.r160_in1k", {"foo.weight": torch.zeros(2)})
    with pytest.raises(WeightsMismatch, match="does not fit timm:test_vit"):
        load_encoder("timm:test_vit")


def test_timm_auto_offline_error_is_fast():
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as e:
        load_encoder("imagenet-vits16")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "huggingface.co" in msg and "--weights PATH" in msg and "--weights random" in msg


# --- models table -------------------------------------------------------------------


def test_models_table(standins, monkeypatch, tmp_path):
    link(standins["lunit-dino-vits16"], tmp_path / "w")
    monkeypatch.setenv(fetch.WEIGHTS_DIR_ENV, str(tmp_path / "w"))
    rows = {r["name"]: r for r in json.loads(json.dumps(models_table()))}
    assert list(rows) == NAMED
    assert rows["lunit-dino-vits16"]["cached"] is True and rows["lunit-bt-rn50"]["cached"] is False
    for r in rows.values():
        assert {"architecture", "dim", "input_size", "mean", "std", "pooling", "weights_url",
                "weights_file", "licence", "cached"} <= set(r)


@pytest.mark.slow  # in -m slow: keeps CI under 15 minutes
def test_missing_weights_leave_no_output_folders_behind(tmp_path, sample_slide, monkeypatch):
    """A run that stops before any slide (exit 3) removes the folders it made for --out, parents too."""
    from tests.conftest import run_cli
    from wsi_embed import embed_slide

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailable):
        embed_slide(sample_slide, tmp_path / "lib" / "out", models=["lunit-dino-vits8"])
    assert not (tmp_path / "lib").exists()
    proc = run_cli("embed", str(sample_slide), "--out", str(tmp_path / "cli" / "out"), "--model", "lunit-dino-vits8",
                   env={"TORCH_HOME": str(tmp_path / "empty-cache")}, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "lunit-dino-vits8" in proc.stderr
    assert not (tmp_path / "cli").exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    assert run_cli("embed", str(sample_slide), "--out", str(kept), "--model", "lunit-dino-vits8",
                   env={"TORCH_HOME": str(tmp_path / "empty-cache")}, timeout=300).returncode == 3
    assert kept.is_dir()  # a folder the user made stays
    # bench says it the same way: exit 3, one line
    proc = run_cli("bench", str(sample_slide), "--model", "lunit-dino-vits8", "--weights", "auto", "--max-patches", "8",
                   env={"TORCH_HOME": str(tmp_path / "empty-cache")}, timeout=300)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr and "lunit-dino-vits8" in proc.stderr


def test_weights_given_as_a_folder_say_so(tmp_path):
    from wsi_embed.encoders import load_encoder
    from wsi_embed.errors import InvalidOption

    with pytest.raises(InvalidOption, match="weights path is a folder, not a file"):
        load_encoder("timm:test_vit", str(tmp_path))


def test_a_wrong_or_empty_cached_file_says_to_fetch_it_again_and_a_head_says_how_to_drop_it(tmp_path):
    from wsi_embed.encoders import models_table

    cfg = get_config("lunit-dino-vits16")
    cached = hub_checkpoints() / cfg.weights_file
    cached.write_bytes(b"")  # a copy that failed: not cached
    assert not next(r for r in models_table() if r["name"] == cfg.name)["cached"]
    with pytest.raises(WeightsUnavailable):
        load_encoder(cfg.name, "auto")
    torch.save(build_module(get_config("lunit-dino-vits8")).state_dict(), cached)  # another model's file there
    with pytest.raises(WeightsMismatch, match="is not them; delete it so that it is fetched again") as err:
        load_encoder(cfg.name, "auto")
    assert "use --model" not in str(err.value) and cfg.weights_url in str(err.value)
    sd = build_module(get_config("lunit-bt-rn50")).state_dict()
    sd.update({"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)})
    torch.save(sd, tmp_path / "finetuned.pth")
    with pytest.raises(WeightsMismatch, match=r"use --model imagenet-rn50 if that is what it is; if it is "
                                              r"lunit-bt-rn50's trunk with a classification head, save it "
                                              r"without its fc\.\* keys"):
        load_encoder("lunit-bt-rn50", str(tmp_path / "finetuned.pth"))
