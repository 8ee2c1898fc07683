"""What each encoder is: architecture, published weights, normalization, output.

Everything here is plain data; building modules and loading weights live in
``build.py`` and ``weights.py`` so that listing models stays cheap.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from wsi_embed.errors import UnknownModel

LUNIT_URL_PREFIX = (
    "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
)
# Published with the Lunit weights (Kang et al., CVPR 2023); these are the
# statistics the trunks were trained with, so never swap in ImageNet's.
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
LUNIT_LICENCE = "Lunit non-commercial research-only licence (benchmark-ssl-pathology)"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EncoderConfig:
    name: str
    architecture: str  # for people: shown by `wsi-embed models` and stored in attrs
    family: str  # "torchvision-resnet50" | "timm-vit" | "timm": picks the builder
    builder_kwargs: tuple[tuple[str, Any], ...]
    weights_url: str | None
    weights_file: str | None  # file name in the torch hub cache / $WSI_EMBED_WEIGHTS_DIR
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str  # "gap" | "cls" | "timm-default"
    dim: int
    licence: str
    # Published keys that are not part of the trunk (classifier heads), dropped before
    # the strict load.
    ignore_prefixes: tuple[str, ...] = field(default=())
    # Checked on download when known (torchvision names its files by hash prefix).
    sha256_prefix: str | None = None
    # timm models: where timm's pretrained_cfg says the weights live (hf_hub_id, hf_hub_filename,
    # url), so that `wsi-embed models` can check the caches without importing timm (and torch).
    timm_source: tuple[tuple[str, str | None], ...] = field(default=())

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.builder_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "family": self.family,
            "builder_kwargs": dict(self.builder_kwargs),
            "weights_url": self.weights_url,
            "weights_file": self.weights_file,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pooling": self.pooling,
            "dim": self.dim,
            "licence": self.licence,
        }


def _lunit_rn50(name: str, method: str, file: str) -> EncoderConfig:
    return EncoderConfig(
        name=name,
        architecture=f"ResNet-50 trunk ({method}, Lunit pathology)",
        family="torchvision-resnet50",
        builder_kwargs=(),
        weights_url=LUNIT_URL_PREFIX + file,
        weights_file=file,
        input_size=224,
        mean=LUNIT_MEAN,
        std=LUNIT_STD,
        pooling="gap",
        dim=2048,
        licence=LUNIT_LICENCE,
    )


def _lunit_vit(name: str, patch: int, file: str) -> EncoderConfig:
    return EncoderConfig(
        name=name,
        architecture=f"ViT-S/{patch} (DINO, Lunit pathology)",
        family="timm-vit",
        # Exactly the VisionTransformer(...) call of Lunit's own loader.
        builder_kwargs=(
            ("img_size", 224),
            ("patch_size", patch),
            ("embed_dim", 384),
            ("num_heads", 6),
            ("num_classes", 0),
        ),
        weights_url=LUNIT_URL_PREFIX + file,
        weights_file=file,
        input_size=224,
        mean=LUNIT_MEAN,
        std=LUNIT_STD,
        pooling="cls",
        dim=384,
        licence=LUNIT_LICENCE,
    )


def _imagenet_rn50() -> EncoderConfig:
    # Same as torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url (checked by a test);
    # kept literal so listing models does not import torchvision.
    url = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    return EncoderConfig(
        name="imagenet-rn50",
        architecture="ResNet-50 trunk (torchvision ImageNet-1k V2, supervised)",
        family="torchvision-resnet50",
        builder_kwargs=(),
        weights_url=url,
        weights_file=url.rsplit("/", 1)[-1],
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pooling="gap",
        dim=2048,
        licence="BSD-3-Clause (torchvision)",
        ignore_prefixes=("fc",),
        sha256_prefix="11ad3fa6",
    )


def _timm_source(pcfg: dict[str, Any]) -> tuple[tuple[str, str | None], ...]:
    return tuple((k, pcfg.get(k) or None) for k in ("hf_hub_id", "hf_hub_filename", "url"))


def _imagenet_vits16() -> EncoderConfig:
    # Values from timm's pretrained_cfg for this tag (checked by a test).
    tname = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    npz = ("https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-"
           "do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz")
    return EncoderConfig(
        name="imagenet-vits16",
        architecture="ViT-S/16 (timm AugReg ImageNet-21k, fine-tuned ImageNet-1k)",
        family="timm",
        builder_kwargs=(("model_name", tname), ("num_classes", 0)),
        weights_url=f"https://huggingface.co/timm/{tname}",
        weights_file=None,
        input_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pooling="cls",
        dim=384,
        licence="Apache-2.0",
        ignore_prefixes=("head",),
        timm_source=_timm_source({"hf_hub_id": f"timm/{tname}", "url": npz}),
    )


_REGISTRY: dict[str, EncoderConfig] = {
    c.name: c
    for c in (
        _lunit_rn50("lunit-bt-rn50", "Barlow Twins", "bt_rn50_ep200.torch"),
        _lunit_rn50("lunit-mocov2-rn50", "MoCo v2", "mocov2_rn50_ep200.torch"),
        _lunit_rn50("lunit-swav-rn50", "SwAV", "swav_rn50_ep200.torch"),
        _lunit_vit("lunit-dino-vits16", 16, "dino_vit_small_patch16_ep200.torch"),
        _lunit_vit("lunit-dino-vits8", 8, "dino_vit_small_patch8_ep200.torch"),
        _imagenet_rn50(),
        _imagenet_vits16(),
    )
}


def list_configs() -> list[EncoderConfig]:
    """The named models, in registry order (``timm:<name>`` models are open-ended)."""
    return list(_REGISTRY.values())


def _valid_names_hint() -> str:
    names = ", ".join(_REGISTRY)
    return (
        f"Valid names: {names}; or timm:<name> for any timm model "
        "(e.g. timm:resnet18). `wsi-embed models` lists them with details."
    )


def get_config(name: str) -> EncoderConfig:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_config(name[len(TIMM_PREFIX):])
    raise UnknownModel(f"unknown model {name!r}. {_valid_names_hint()}")


@functools.lru_cache(maxsize=64)
def _timm_config(tname: str) -> EncoderConfig:
    import timm
    import torch

    if not tname or ":" in tname:
        # "hf-hub:..." / "local-dir:..." would make timm fetch a config over the
        # network (with long retries) just to build the architecture.
        raise UnknownModel(
            f"unsupported timm model name {tname!r} (from 'timm:{tname}'): give a name from "
            "timm's own registry (timm.list_models()), e.g. timm:vit_small_patch16_224, and "
            f"load other weights with --weights PATH. {_valid_names_hint()}"
        )
    try:
        # Built on the meta device: no memory, no init cost, no download.
        with torch.device("meta"):
            model = timm.create_model(tname, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm: "Unknown model (...)" / "Invalid pretrained tag ..."
        raise UnknownModel(
            f"unknown timm model {tname!r} (from 'timm:{tname}'): {e} "
            f"(timm {timm.__version__}; timm.list_models() names them). {_valid_names_hint()}"
        ) from None
    pcfg = dict(model.pretrained_cfg)
    size = int(pcfg["input_size"][-1])
    # num_features is not always the pooled output width (e.g. MobileNetV3's
    # head conv), so take the width from a meta-device forward.
    with torch.device("meta"):
        dim = int(model(torch.empty(1, 3, size, size)).shape[-1])
    classifier = pcfg.get("classifier") or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    hub_id = pcfg.get("hf_hub_id")
    arch = pcfg.get("architecture") or tname.split(".")[0]
    tag = pcfg.get("tag")
    return EncoderConfig(
        name=TIMM_PREFIX + tname,
        architecture=f"timm {arch}" + (f".{tag}" if tag else ""),
        family="timm",
        builder_kwargs=(("model_name", tname), ("num_classes", 0)),
        weights_url=(f"https://huggingface.co/{hub_id}" if hub_id else pcfg.get("url") or None),
        weights_file=None,
        input_size=size,
        mean=tuple(float(v) for v in pcfg["mean"]),
        std=tuple(float(v) for v in pcfg["std"]),
        pooling="timm-default",
        dim=dim,
        licence=str(pcfg.get("license") or "unknown (see the timm model card)"),
        ignore_prefixes=tuple(classifier),
        timm_source=_timm_source(pcfg),
    )
