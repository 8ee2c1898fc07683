"""Pathology encoders: registry, exact architectures and weight loading.

    enc = load_encoder("lunit-dino-vits16")           # published weights (cache or download)
    enc = load_encoder("lunit-bt-rn50", "random")     # smoke test, meaningless embeddings
    feats = enc.module(batch)                          # normalized NCHW float -> (N, enc.config.dim)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .registry import EncoderConfig, get_config, list_configs
from .weights import WeightsInfo, find_published, resolve, timm_cached_file

__all__ = [
    "Encoder",
    "EncoderConfig",
    "WeightsInfo",
    "get_config",
    "list_configs",
    "load_encoder",
    "models_table",
]


@dataclass(frozen=True)
class Encoder:
    config: EncoderConfig
    module: nn.Module  # eval mode, no gradients
    weights: WeightsInfo

    def attrs(self) -> dict[str, Any]:
        """JSON-able description stored with the embeddings."""
        c, w = self.config, self.weights
        return {
            "name": c.name,
            "architecture": c.architecture,
            "weights_source": w.source,
            "weights_spec": w.spec,
            "weights_path": w.path,
            "weights_url": w.url,
            "weights_sha256": w.sha256,
            "weights_random": w.random,
            "mean": list(c.mean),
            "std": list(c.std),
            "pooling": c.pooling,
            "input_size": c.input_size,
            "dim": c.dim,
            "licence": c.licence,
        }


def load_encoder(name: str, weights: str = "auto") -> Encoder:
    """Build ``name`` and load ``weights`` (auto | random | PATH | URL) into it."""
    cfg = get_config(name)
    module, info = resolve(cfg, weights)
    module.eval()
    module.requires_grad_(False)
    return Encoder(cfg, module, info)


def _cached(cfg: EncoderConfig) -> bool:
    """Whether ``auto`` would find the weights here without network."""
    if cfg.weights_file:
        return find_published(cfg) is not None
    if cfg.family == "timm":
        from .weights import _timm_pretrained_cfg

        return timm_cached_file(_timm_pretrained_cfg(cfg.kwargs["model_name"])) is not None
    return False


def models_table() -> list[dict[str, Any]]:
    """One row per named model, for ``wsi-embed models [--json]``."""
    rows = []
    for cfg in list_configs():
        row = cfg.to_dict()
        del row["family"], row["builder_kwargs"]
        row["cached"] = _cached(cfg)
        rows.append(row)
    return rows
