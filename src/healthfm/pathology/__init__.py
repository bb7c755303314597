"""The pathology modality: whole-slide images and tiles → ViT embeddings, probes and MIL.

The modality class, its defaults and their reasons: :mod:`healthfm.pathology.modality`.
"""

from __future__ import annotations

from healthfm.pathology.modality import MODALITY, PathologyModality
from healthfm.pathology.reader import open_slide, read_image
from healthfm.pathology.source import TileSource, embed_tiles
from healthfm.pathology.tilesets import TileSet, read_tile_set
from healthfm.pathology.tiling import tile_slide
from healthfm.pathology.tokenizer import PatchTokenizer

__all__ = [
    "MODALITY",
    "PatchTokenizer",
    "PathologyModality",
    "TileSet",
    "TileSource",
    "embed_tiles",
    "open_slide",
    "read_image",
    "read_tile_set",
    "tile_slide",
]
