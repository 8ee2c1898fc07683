"""Pathology encoders: registry, exact architectures and weight loading.

    enc = load_encoder("lunit-dino-vits16")           # published weights (cache or download)
    enc = load_encoder("lunit-bt-rn50", "random")     # smoke test, meaningless embeddings
    feats = enc.module(batch)                          # normalized NCHW float -> (N, enc.config.dim)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .fetch import find_published, timm_cached_file
from .registry import EncoderConfig, get_config, list_configs

if TYPE_CHECKING:
    from torch import nn

    from .weights import WeightsInfo, resolve

# Listing models must not import torch (`wsi-embed models` is a first screen): what needs it is
# imported on first use.
_LAZY = {"WeightsInfo": ".weights", "resolve": ".weights"}

__all__ = [
    "Encoder",
    "EncoderConfig",
    "WeightsInfo",
    "get_config",
    "list_configs",
    "load_encoder",
    "models_table",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from .weights import resolve

    cfg = get_config(name)
    module, info = resolve(cfg, weights)
    module.eval()
    module.requires_grad_(False)
    return Encoder(cfg, module, info)


def _cached(cfg: EncoderConfig) -> bool | None:
    """Whether ``auto`` would find the weights here without network (None: cannot tell cheaply)."""
    if cfg.weights_file:
        return find_published(cfg) is not None
    if cfg.family == "timm":
        if not cfg.timm_source:
            return None
        return timm_cached_file(dict(cfg.timm_source)) is not None
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
