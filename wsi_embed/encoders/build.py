"""Build each encoder's exact architecture, randomly initialized. Never downloads."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .registry import EncoderConfig


class ResNetTrunk(ResNet):
    """torchvision ResNet-50 without ``fc``: the module Lunit's files load into.

    Deleting ``fc`` (rather than replacing it with Identity) keeps the state-dict
    keys identical to the published bare files: ``conv1.weight``, ``bn1.*``,
    ``layer1.*`` ... ``layer4.*``.
    """

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        del self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # global average pool -> (N, 2048)


def build_module(cfg: EncoderConfig) -> nn.Module:
    """The architecture of ``cfg``; ``forward`` maps a normalized NCHW batch to (N, dim)."""
    kwargs = cfg.kwargs
    if cfg.family == "torchvision-resnet50":
        return ResNetTrunk()
    if cfg.family == "timm-vit":
        from timm.models.vision_transformer import VisionTransformer

        # timm's defaults match DINO's ViT (qkv_bias, LayerNorm eps 1e-6, class
        # token, global_pool="token"), so forward returns the final-normed CLS token.
        return VisionTransformer(**kwargs)
    if cfg.family == "timm":
        import timm

        return timm.create_model(kwargs.pop("model_name"), pretrained=False, **kwargs)
    raise ValueError(f"no builder for family {cfg.family!r} ({cfg.name})")
