"""The pathology modality: whole-slide images and tiles → ViT embeddings, probes and MIL.

* ``healthfm tile SLIDE_OR_DIR --mpp 0.5 --size 224 --out DIR`` — tissue detection and
  tiling into Trident-layout HDF5 files (see :mod:`healthfm.pathology.tiling`) with a
  thumbnail per slide.
* ``healthfm pretrain pathology TILES_OR_SLIDES --out MODEL`` — MAE pretraining of a ViT
  (the core backbone with a patch embedder) on tiles, with H&E augmentations.
* ``healthfm embed MODEL SLIDE_OR_TILES --out DIR`` — Trident HDF5 with ``features`` per
  slide, or ``embeddings.parquet`` + ``manifest.csv`` for a tile set.
* ``healthfm evaluate MODEL TILE_DIR --out DIR`` — eva-style linear probe over repeated
  runs next to colour-histogram and raw-pixel baselines.
* ``healthfm evaluate-slides MODEL FEATURES_DIR --labels slides.csv --out DIR`` — gated
  ABMIL vs mean pooling, with attention heat maps.
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
