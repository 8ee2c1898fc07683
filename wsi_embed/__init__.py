"""wsi-embed: whole-slide images in, per-slide embedding grids (Zarr v3) out."""

__version__ = "0.1.0"

from .errors import WsiEmbedError  # noqa: E402
from .pipeline import EmbedOptions, SlideJob, SlideResult, embed_slide, embed_slides  # noqa: E402
from .store import EmbeddingStore, open_store  # noqa: E402

__all__ = [
    "EmbedOptions", "EmbeddingStore", "SlideJob", "SlideResult", "WsiEmbedError",
    "embed_slide", "embed_slides", "open_store", "__version__",
]
