"""The encoder zoo inside the pipeline: each Lunit trunk against an independent computation,
several encoders in one pass, and resizing to an encoder's own input size."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from tests.weights_helpers import PUBLISHED_FILES, published_module
from wsi_embed import EmbedOptions, embed_slide, open_store

LUNIT_MEAN = torch.tensor([0.70322989, 0.53606487, 0.66096631])[:, None, None]
LUNIT_STD = torch.tensor([0.21716536, 0.26081574, 0.20723464])[:, None, None]


def independent(name, torch_home):
    """The published module definition loaded straight from the cached file."""
    model = published_module(name)
    sd = torch.load(torch_home / "hub" / "checkpoints" / PUBLISHED_FILES[name], map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    if name.endswith("rn50"):
        model.fc = torch.nn.Identity()  # torchvision's forward: ... avgpool, flatten, fc
    return model.eval()


def read_cell(slide_path, xy, level, read_px, size):
    with openslide.OpenSlide(str(slide_path)) as s:
        img = s.read_region((int(xy[0]), int(xy[1])), level, (read_px, read_px)).convert("RGB")
    if read_px != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    return ((x - LUNIT_MEAN) / LUNIT_STD)[None]


# Every trunk runs under `-m slow`; the default suite keeps one ResNet-50 and one ViT (same code paths).
_DEFAULT = {"lunit-bt-rn50", "lunit-dino-vits16"}


@pytest.mark.parametrize("name", [n if n in _DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PUBLISHED_FILES])
def test_lunit_trunk_matches_independent_computation(name, sample_slide, offline_torch_home, tmp_path):
    opts = EmbedOptions(dtype="float32", device="cpu", precision="fp32", workers=0, max_patches=6)
    result = embed_slide(sample_slide, tmp_path, [name], "auto", opts)
    assert result.status == "done", result.error
    store = open_store(result.store)
    enc = store.encoder_attrs(name)
    assert enc["weights_source"] == "published-cache" and enc["weights_random"] is False
    assert enc["mean"] == pytest.approx(LUNIT_MEAN.flatten().tolist())
    grid, emb = store.attrs["grid"], store.embeddings(name)[...]
    model = independent(name, offline_torch_home)
    cells = list(zip(*np.nonzero(store.mask)))
    assert len(cells) == 6
    refs, stored = [], []
    with torch.inference_mode():
        for r, c in cells[::2]:
            x = read_cell(sample_slide, store.coords[r, c], grid["level"], grid["read_px"], 224)
            refs.append(model(x)[0].numpy())
            stored.append(emb[r, c])
    refs, stored = np.stack(refs), np.stack(stored)
    cos = (refs * stored).sum(1) / np.linalg.norm(refs, axis=1) / np.linalg.norm(stored, axis=1)
    assert cos.min() >= 0.999, cos
    # discriminating: the error is far below the differences between cells
    between = min(np.linalg.norm(refs[i] - refs[j]) for i in range(len(refs)) for j in range(i))
    assert np.linalg.norm(refs - stored, axis=1).max() < 0.05 * between


def test_two_encoders_in_one_pass_equal_two_single_runs(sample_slide, tmp_path):
    opts = EmbedOptions(dtype="float32", workers=0, max_patches=20)
    both = embed_slide(sample_slide, tmp_path / "both", ["timm:test_vit", "timm:test_resnet"], "random", opts)
    one = embed_slide(sample_slide, tmp_path / "a", ["timm:test_vit"], "random", opts)
    two = embed_slide(sample_slide, tmp_path / "b", ["timm:test_resnet"], "random", opts)
    s_both, s_one, s_two = (open_store(r.store) for r in (both, one, two))
    assert sorted(s_both.encoders) == ["timm:test_resnet", "timm:test_vit"]
    for name, single in (("timm:test_vit", s_one), ("timm:test_resnet", s_two)):
        a, b = s_both.embeddings(name)[...], single.embeddings(name)[...]
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert (s_both.mask == s_one.mask).all() and s_both.mask.sum() == 20


def test_patch_resized_to_encoder_input_size(sample_slide, tmp_path):
    """timm:test_vit takes 160 px: the 224 px patch is resized on the device and the store says so."""
    result = embed_slide(sample_slide, tmp_path, ["timm:test_vit"], "random", EmbedOptions(workers=0, max_patches=4))
    enc = open_store(result.store).encoder_attrs()
    assert enc["input_size"] == 160 and enc["input_resized"] is True
    assert enc["input_resize"] == "224px read -> 160px encoder input"
    assert enc["input_resize_method"] == "antialiased bilinear on uint8 (cpu)"
