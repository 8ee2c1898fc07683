"""wsi-embed: whole-slide images in, per-slide embedding grids (Zarr v3) out.

The public names are imported on first use, so that ``import wsi_embed`` (and ``wsi-embed --help``,
``info``, ``models``) stay quick and do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import WsiEmbedError  # noqa: E402  (no heavy imports)

if TYPE_CHECKING:
    from .jobs import EmbedOptions, SlideJob, SlideResult
    from .pipeline import embed_slide, embed_slides
    from .store import EmbeddingStore, open_store

# public name -> module that defines it
_LAZY = {
    "EmbedOptions": ".jobs",
    "SlideJob": ".jobs",
    "SlideResult": ".jobs",
    "embed_slide": ".pipeline",
    "embed_slides": ".pipeline",
    "EmbeddingStore": ".store",
    "open_store": ".store",
}

__all__ = [
    "EmbedOptions", "EmbeddingStore", "SlideJob", "SlideResult", "WsiEmbedError",
    "embed_slide", "embed_slides", "open_store", "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
