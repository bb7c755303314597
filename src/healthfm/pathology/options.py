"""The pathology modality's options (tiling, tile sets, patching, MAE); CLI flags come
from here."""

from __future__ import annotations

from dataclasses import dataclass

from healthfm.options import Options, option


@dataclass
class PathologyOptions(Options):
    """Tiling, tile-set, patching and MAE options."""

    title = "pathology"

    mpp: float = option(
        0.5, "target microns per pixel of tiles cut from slides (default 0.5)", minimum=1e-6
    )
    size: int = option(224, "tile side in pixels at --mpp (default 224)", minimum=1)
    overlap: int = option(0, "tile overlap in pixels (default 0)", minimum=0)
    min_tissue: float = option(
        0.5, "minimum tissue fraction of a tile (default 0.5)", minimum=0.0, maximum=1.0
    )
    slide_mpp: float | None = option(None, "microns per level-0 pixel when the slide does not say")
    test_dir: str | None = option(
        None, "tile folder used as the official test split (e.g. CRC-VAL-HE-7K)"
    )
    image_size: int = option(
        224, "tiles are resized to this side for the model (default 224)", minimum=1
    )
    patch_size: int = option(16, "ViT patch side (default 16)", minimum=1)
    mask_ratio: float = option(0.75, "MAE: fraction of patches hidden (default 0.75)")
    tile_dir: str | None = option(
        None, "where tiles of slide inputs go (default: a run or temporary folder)"
    )
    num_workers: int = option(0, "DataLoader workers decoding tiles", cli=False)
