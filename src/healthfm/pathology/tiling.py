"""Tissue detection, tiling at a target resolution, Trident-layout HDF5 and thumbnails.

The per-slide HDF5 file follows the layout Trident (Mahmood Lab) writes and reads, so
coordinates and features move between the two tools:

* ``coords`` — int64 ``(N, 2)``: ``(x, y)`` of each tile's top-left corner in **level-0**
  pixels. Its attributes: ``patch_size`` (tile side in pixels at the target resolution),
  ``patch_size_level0`` (tile side in level-0 pixels), ``level0_magnification``,
  ``target_magnification``, ``overlap`` (pixels at the target resolution), ``name`` (slide
  stem), ``savetodir``; healthfm adds ``level`` (pyramid level read), ``read_size`` (tile
  side read at that level), ``target_mpp``, ``level0_mpp``, ``level0_width`` /
  ``level0_height``, ``min_tissue``.
* ``features`` — float32 ``(N, D)`` tile embeddings, row ``i`` for ``coords[i]`` (written
  by ``healthfm embed``), with attributes ``model_hash``, ``pooling``.
* ``tissue_fraction`` — float32 ``(N,)`` tissue fraction of each tile (healthfm extra).

The same attributes are mirrored on the file root. Files are written under a temporary
name and renamed, so an interrupted run never leaves a partial ``.h5`` behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from healthfm.errors import ConfigError, DataError
from healthfm.fsutil import atomic_write_bytes
from healthfm.pathology.reader import Slide, encode_png

#: A requested mpp finer than the slide's by more than this fraction cannot be provided.
MPP_TOLERANCE = 0.1


@dataclass
class TileGrid:
    """Tiles chosen on one slide.

    Attributes
    ----------
    coords
        ``(N, 2)`` int64 level-0 ``(x, y)`` of each tile's top-left corner.
    tissue_fraction
        ``(N,)`` tissue fraction of each tile.
    attrs
        The Trident ``coords`` attributes (see the module docstring).
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.coords)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximizes the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def tissue_mask(
    rgb: np.ndarray, min_saturation: float = 0.05, min_object_fraction: float = 0.0005
) -> np.ndarray:
    """Tissue mask of a low-resolution RGB view.

    Otsu on the HSV saturation (stained tissue is coloured, glass is grey-white), never
    below ``min_saturation``; holes filled (lumina, fat inside tissue), objects smaller
    than ``min_object_fraction`` of the image removed (dust, debris).
    """
    img = rgb.astype(np.float32) / 255.0
    mx, mn = img.max(axis=-1), img.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    thr = max(otsu_threshold(sat), min_saturation)
    # Near-black pixels (pen, scanner edge) are not tissue.
    mask = (sat > thr) & (mx > 0.1)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1, min_object_fraction * mask.size)
        keep[0] = False
        mask = keep[labels]
    return mask


def plan_tiles(
    slide: Slide,
    mpp: float = 0.5,
    size: int = 224,
    overlap: int = 0,
    min_tissue: float = 0.5,
    mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
) -> TileGrid:
    """Choose tiles of ``size`` pixels at ``mpp`` microns per pixel on a slide.

    Parameters
    ----------
    slide
        The open slide; its ``mpp`` must be known (or given to :func:`open_slide`).
    mpp
        Target microns per pixel (0.5 ≈ 20×, 0.25 ≈ 40×).
    size
        Tile side in target pixels.
    overlap
        Overlap between neighbouring tiles in target pixels.
    min_tissue
        Keep tiles whose tissue fraction is at least this (0 keeps every tile).
    mask, mask_downsample
        A precomputed tissue mask and its downsample from level 0 (computed when None).

    Raises
    ------
    DataError
        If the slide's resolution is unknown or coarser than ``mpp``, or no tile has
        enough tissue.
    """
    if size < 8 or overlap < 0 or overlap >= size:
        raise ConfigError(
            f"need size >= 8 and 0 <= overlap < size (size={size}, overlap={overlap})"
        )
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue must be in [0, 1], not {min_tissue}")
    if slide.mpp is None:
        raise DataError(
            "the slide does not record its microns per pixel; pass --slide-mpp",
            file=slide.path,
            column="mpp",
        )
    if mpp < slide.mpp * (1 - MPP_TOLERANCE):
        raise DataError(
            f"requested {mpp} µm/px but the slide's finest level is {slide.mpp:.4g} µm/px; "
            "a slide cannot provide more detail than it was scanned at",
            file=slide.path,
            column="mpp",
        )
    scale = mpp / slide.mpp  # level-0 pixels per target pixel
    if abs(scale - 1) < MPP_TOLERANCE:
        scale = 1.0  # within tolerance of the scan resolution: read it as is
    level = slide.best_level(scale)
    ds = slide.levels[level].downsample
    read_size = max(1, round(size * scale / ds))
    size0 = round(size * scale)
    step0 = max(1, round((size - overlap) * scale))
    w0, h0 = slide.dimensions
    xs = np.arange(0, w0 - size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, h0 - size0 + 1, step0, dtype=np.int64)
    if len(xs) == 0 or len(ys) == 0:
        raise DataError(
            f"slide ({w0}×{h0} px) is smaller than one tile ({size0} level-0 px)", file=slide.path
        )
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    if mask is None:
        low, mask_downsample = slide.low_res()
        mask = tissue_mask(low)
    frac = box_fractions(mask, coords, size0, float(mask_downsample))
    keep = frac >= min_tissue if min_tissue > 0 else np.ones(len(coords), dtype=bool)
    if not mask.any() or not keep.any():
        raise DataError(
            f"no tissue found: no tile of {size} px at {mpp} µm/px has a tissue fraction "
            f">= {min_tissue} (tissue covers {mask.mean():.1%} of the thumbnail)",
            file=slide.path,
        )
    attrs = {
        "patch_size": int(size),
        "patch_size_level0": int(size0),
        "level0_magnification": float(slide.magnification) if slide.magnification else -1.0,
        "target_magnification": float(slide.magnification / scale) if slide.magnification else -1.0,
        "overlap": int(overlap),
        "name": slide.path.stem,
        "savetodir": "",
        "level": int(level),
        "read_size": int(read_size),
        "target_mpp": float(mpp),
        "level0_mpp": float(slide.mpp),
        "level0_width": int(w0),
        "level0_height": int(h0),
        "min_tissue": float(min_tissue),
        "source": str(slide.path),
    }
    return TileGrid(coords[keep], frac[keep].astype(np.float32), attrs)


def box_fractions(
    mask: np.ndarray, coords: np.ndarray, size0: int, downsample: float
) -> np.ndarray:
    """Mean of ``mask`` over each level-0 box ``(x, y, size0)``, vectorized (integral image)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) / downsample).astype(np.int64), 0, h)
    x1, y1 = np.maximum(x1, x0 + 1).clip(max=w), np.maximum(y1, y0 + 1).clip(max=h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area


# ------------------------------------------------------------------------------- HDF5


def write_tiles_h5(
    path: str | Path,
    grid: TileGrid,
    features: np.ndarray | None = None,
    feature_attrs: dict[str, Any] | None = None,
    datasets: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a Trident-layout HDF5 (``coords`` [+ ``features``]) atomically.

    Parameters
    ----------
    path
        Target ``.h5`` file (replaced if it exists).
    grid
        Coordinates, tissue fractions and attributes.
    features
        Optional ``(N, D)`` float32 embeddings, one row per coordinate.
    feature_attrs
        Attributes of the ``features`` dataset (model hash, pooling ...).
    datasets
        Further per-tile datasets (e.g. ``attention``), one row per coordinate.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if features is not None and len(features) != len(grid.coords):
        raise ValueError(f"{len(features)} feature rows for {len(grid.coords)} tiles")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h5:
            ds = h5.create_dataset("coords", data=np.asarray(grid.coords, dtype=np.int64))
            for key, value in grid.attrs.items():
                ds.attrs[key] = value
                h5.attrs[key] = value
            h5.create_dataset(
                "tissue_fraction", data=np.asarray(grid.tissue_fraction, dtype=np.float32)
            )
            if features is not None:
                fs = h5.create_dataset("features", data=np.asarray(features, dtype=np.float32))
                for key, value in (feature_attrs or {}).items():
                    fs.attrs[key] = value
            for name, values in (datasets or {}).items():
                h5.create_dataset(name, data=np.asarray(values))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_tiles_h5(path: str | Path) -> tuple[TileGrid, np.ndarray | None]:
    """Read a Trident-layout HDF5: the tile grid and the features (or None).

    Files written by Trident itself (no ``tissue_fraction``, fewer attributes) are read too.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            if "coords" not in h5:
                raise DataError(
                    "HDF5 file has no 'coords' dataset (not a tile file)",
                    file=path,
                    column="coords",
                )
            coords = np.asarray(h5["coords"][:], dtype=np.int64)
            attrs = {k: _py(v) for k, v in h5["coords"].attrs.items()}
            frac = (
                np.asarray(h5["tissue_fraction"][:], dtype=np.float32)
                if "tissue_fraction" in h5
                else np.ones(len(coords), dtype=np.float32)
            )
            features = np.asarray(h5["features"][:], dtype=np.float32) if "features" in h5 else None
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"not a readable HDF5 file: {exc}", file=path) from exc
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise DataError(
            f"'coords' must have shape (N, 2), not {coords.shape}", file=path, column="coords"
        )
    if features is not None and len(features) != len(coords):
        raise DataError(
            f"'features' has {len(features)} rows for {len(coords)} coords",
            file=path,
            column="features",
        )
    return TileGrid(coords, frac, attrs), features


def _py(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# -------------------------------------------------------------------------- thumbnails


def draw_grid(
    thumb: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    size0: int,
    values: np.ndarray | None = None,
    cmap: str = "viridis",
) -> np.ndarray:
    """Draw tile outlines (or, with ``values``, a heat map) over a thumbnail.

    Parameters
    ----------
    thumb
        Low-resolution RGB view.
    downsample
        Its downsample from level 0.
    coords
        Level-0 tile corners.
    size0
        Tile side in level-0 pixels.
    values
        Optional per-tile scores in any range (e.g. attention); drawn as filled,
        semi-transparent boxes coloured by rank-normalized value.
    """
    from PIL import Image, ImageDraw

    base = Image.fromarray(thumb).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    boxes = (
        np.column_stack([coords / downsample, (coords + size0) / downsample]).round().astype(int)
    )
    if values is not None:
        import matplotlib

        v = np.asarray(values, dtype=np.float64)
        span = v.max() - v.min()
        norm = (v - v.min()) / span if span > 0 else np.full_like(v, 0.5)
        colours = (matplotlib.colormaps[cmap](norm)[:, :3] * 255).astype(int)
        for (x0, y0, x1, y1), col in zip(boxes, colours, strict=True):
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(*col.tolist(), 150))
    else:
        for x0, y0, x1, y1 in boxes:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 90, 255, 255), width=1)
    return np.asarray(Image.alpha_composite(base, layer).convert("RGB"))


def write_png(path: str | Path, img: np.ndarray) -> Path:
    """Write an RGB array as PNG atomically."""
    atomic_write_bytes(path, encode_png(img))
    return Path(path)


# ---------------------------------------------------------------------------- tiling


def tile_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    mpp: float = 0.5,
    size: int = 224,
    overlap: int = 0,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
) -> tuple[Path, TileGrid]:
    """Tile one slide: ``out_dir/patches/<stem>.h5`` and ``out_dir/thumbnails/<stem>.png``.

    The thumbnail has the tile grid drawn over it; ``out_dir/thumbnails/<stem>.raw.png``
    is the plain thumbnail (heat maps are drawn on it later) and its downsample is stored
    in the HDF5 attribute ``thumbnail_downsample``.

    Returns
    -------
    (Path, TileGrid)
        The HDF5 file and the grid.
    """
    from healthfm.pathology.reader import open_slide

    out_dir = Path(out_dir)
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        low, ds = slide.low_res()
        grid = plan_tiles(slide, mpp, size, overlap, min_tissue, tissue_mask(low), ds)
        check_tiles_decode(slide, grid, slide_path)
    grid.attrs["thumbnail_downsample"] = float(ds)
    grid.attrs["savetodir"] = str(out_dir / "patches")
    stem = Path(slide_path).stem
    outputs = [
        out_dir / "thumbnails" / f"{stem}.raw.png",
        out_dir / "thumbnails" / f"{stem}.png",
        out_dir / "patches" / f"{stem}.h5",
    ]
    try:  # all three, or none: a failure midway leaves no thumbnail without its tiles
        write_png(outputs[0], low)
        write_png(outputs[1], draw_grid(low, ds, grid.coords, grid.attrs["patch_size_level0"]))
        h5 = write_tiles_h5(outputs[2], grid)
    except BaseException:
        for path in outputs:
            path.unlink(missing_ok=True)
        raise
    return h5, grid


#: Tiles decoded by :func:`check_tiles_decode` (spread over the grid).
DECODE_CHECK_TILES = 16


def check_tiles_decode(slide: Any, grid: TileGrid, path: str | Path) -> None:
    """Decode a few tiles spread over the grid at its level: a slide whose tile data are
    corrupt (truncated JPEG tiles) fails here, before any file is written, rather than
    when it is embedded."""
    n = len(grid.coords)
    if n == 0:
        return
    level, side = int(grid.attrs["level"]), int(grid.attrs["read_size"])
    for i in np.unique(np.linspace(0, n - 1, min(n, DECODE_CHECK_TILES)).astype(np.int64)):
        x, y = (int(v) for v in grid.coords[i])
        try:
            tile = slide.read_region(x, y, level, side, side)
        except DataError:
            raise
        except Exception as exc:  # decoders raise many types on corrupt data
            raise DataError(
                f"tile {int(i)} at ({x}, {y}) cannot be decoded (corrupt tile data?): {exc}",
                file=path,
                row=int(i),
            ) from None
        if tile is None or np.asarray(tile).shape[:2] != (side, side):
            raise DataError(
                f"tile {int(i)} at ({x}, {y}) decodes to no image", file=path, row=int(i)
            )


def find_slides(path: str | Path) -> list[Path]:
    """A slide file, or the slide files directly inside a folder (sorted)."""
    from healthfm.pathology.reader import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("no such slide file or folder", file=path)
    found = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES + OPENSLIDE_SUFFIXES
    )
    if not found:
        raise DataError("folder holds no slide files (.svs, .tif, .tiff, ...)", file=path)
    return found


# --------------------------------------------------------------------- tile reading


class SlideTiles:
    """Map-style dataset over index batches of one slide's tiles (for DataLoader workers).

    ``dataset[indices]`` returns a uint8 tensor ``(B, size, size, 3)``: each tile is read
    at the grid's pyramid level and resized to the target size. Each worker process
    opens its own file handle (see :class:`~healthfm.pathology.reader.TiffSlide`).
    """

    def __init__(self, slide: Slide, grid: TileGrid) -> None:
        self.slide = slide
        self.coords = grid.coords
        self.level = int(grid.attrs["level"])
        self.read_size = int(grid.attrs["read_size"])
        self.size = int(grid.attrs["patch_size"])

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, indices: Any):
        import torch

        from healthfm.pathology.tokenizer import resize_batch

        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        out = np.empty((len(indices), self.read_size, self.read_size, 3), dtype=np.uint8)
        for j, i in enumerate(indices):
            x, y = self.coords[i]
            out[j] = self.slide.read_region(
                int(x), int(y), self.level, self.read_size, self.read_size
            )
        tiles = torch.from_numpy(out)
        if self.read_size != self.size:
            tiles = resize_batch(tiles, self.size)
        return tiles


def tile_loader(dataset: Any, n: int, batch_size: int, num_workers: int = 0):
    """A DataLoader yielding ``dataset[batch_indices]`` for consecutive index batches, in order."""
    import torch

    batches = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return torch.utils.data.DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
    )
