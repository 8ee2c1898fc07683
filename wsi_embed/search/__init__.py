"""Slide and patch search over a folder of stores.

    from wsi_embed.search import build_index, search
    index = build_index("out", "lunit-bt-rn50")                  # out/index-lunit-bt-rn50/
    search(index, slide="S1", top_k=5)                          # nearest slides
    search(index, patch=("S1", 12, 40))                         # nearest patches of a cell
    search(index, image="patch.png")                            # a PNG, embedded with the stores' encoder

Distances are cosine distances (1 - cos) of L2-normalised embeddings. Exact numpy search up to
:data:`EXACT_MAX_PATCHES` patches, a usearch HNSW graph above.
"""

from __future__ import annotations

from .build import DISTANCE, EXACT_MAX_PATCHES, build_index, index_dir
from .index import SearchIndex, open_index
from .query import format_table, parse_patch, search

__all__ = ["DISTANCE", "EXACT_MAX_PATCHES", "SearchIndex", "build_index", "format_table", "index_dir",
           "open_index", "parse_patch", "search"]
