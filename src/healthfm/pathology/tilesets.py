"""Tile sets: labelled tile folders (Kather 2016, NCT-CRC-HE-100K / CRC-VAL-HE-7K),
PatchCamelyon HDF5 pairs, MHIST, and the tiles of tiled slides — behind one interface.

Every set answers ``load(indices, size)`` with a uint8 tensor ``(B, size, size, 3)``; the
pixels are decoded only then (in DataLoader workers when there are any), so a set of
100,000 tiles costs a list of paths until it is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from healthfm.errors import DataError
from healthfm.fsutil import json_hash, sha256_file
from healthfm.pathology.reader import IMAGE_SUFFIXES, check_rgb, check_tile_size, read_image
from healthfm.pathology.tokenizer import resize_batch

#: Kather 2016 file names: "<tile id>_<source image>.tif_Row_<r>_Col_<c>.tif".
_KATHER_RE = re.compile(r"^[^_]+_(?P<source>.+?\.tif)_Row_\d+_Col_\d+", re.IGNORECASE)
PCAM_RE = re.compile(r"camelyonpatch_level_2_split_(train|valid|test)_(x|y)\.h5$")
MHIST_CSV = "annotations.csv"


@dataclass
class TileSet:
    """A set of tiles with optional labels, groups and official splits.

    Attributes
    ----------
    source
        Folder (or file) read.
    keys
        One id per tile (relative path, ``split:index``, ``slide:x_y``).
    labels
        Class per tile as strings, or None.
    groups
        Split unit per tile (source image, slide); tiles of a group stay in one split.
    splits
        Official split per tile ("train" / "val" / "test"), or None.
    kind
        "folders", "pcam", "mhist" or "slides".
    """

    source: Path
    keys: np.ndarray
    labels: np.ndarray | None
    groups: np.ndarray
    splits: np.ndarray | None
    kind: str
    paths: np.ndarray | None = None
    h5_files: dict[str, tuple[Path, int]] = field(default_factory=dict)
    slides: list[Any] = field(default_factory=list)
    slide_index: np.ndarray | None = None
    data_hash: str = ""

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, indices: np.ndarray, size: int) -> torch.Tensor:
        """Decode tiles ``indices`` as uint8 ``(B, size, size, 3)`` (resized when needed)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.kind == "pcam":
            return self._load_pcam(indices, size)
        if self.kind == "slides":
            return self._load_slides(indices, size)
        out = torch.empty((len(indices), size, size, 3), dtype=torch.uint8)
        for j, i in enumerate(indices):
            img = torch.from_numpy(np.ascontiguousarray(read_image(self.paths[i])))
            out[j] = (
                img
                if img.shape[0] == size and img.shape[1] == size
                else resize_batch(img[None], size)[0]
            )
        return out

    def _load_pcam(self, indices: np.ndarray, size: int) -> torch.Tensor:
        import h5py

        split_of = self.keys[indices]
        out = torch.empty((len(indices), size, size, 3), dtype=torch.uint8)
        for split in np.unique([k.split(":")[0] for k in split_of]):
            path, _ = self.h5_files[split]
            sel = np.flatnonzero(np.char.startswith(split_of.astype(str), split + ":"))
            rows = np.array([int(k.split(":")[1]) for k in split_of[sel]])
            order = np.argsort(rows)
            try:
                with h5py.File(path, "r") as h5:
                    data = np.asarray(h5["x"][rows[order]])  # h5py needs increasing indices
            except (OSError, KeyError) as exc:
                raise DataError(
                    f"cannot read PatchCamelyon tiles: {exc}", file=path, column="x"
                ) from exc
            if len(data):
                check_tile_size(check_rgb(data[0], path), path)
            tiles = torch.from_numpy(data)
            if tiles.shape[1] != size:
                tiles = resize_batch(tiles, size)
            out[sel[order]] = tiles
        return out

    def _load_slides(self, indices: np.ndarray, size: int) -> torch.Tensor:
        out = torch.empty((len(indices), size, size, 3), dtype=torch.uint8)
        which = self.slide_index[indices]
        for s in np.unique(which):
            sel = np.flatnonzero(which == s)
            dataset, offset = self.slides[s]
            tiles = dataset[np.asarray(indices[sel]) - offset]
            if tiles.shape[1] != size:
                tiles = resize_batch(tiles, size)
            out[sel] = tiles
        return out


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _group_of(name: str) -> str:
    found = _KATHER_RE.match(name)
    return found.group("source") if found else name


def read_class_folders(path: str | Path, test_dir: str | Path | None = None) -> TileSet:
    """A folder of class subfolders of images (Kather 2016, NCT-CRC-HE-100K, BACH ...).

    Parameters
    ----------
    path
        The folder; each subfolder is a class, its images (PNG / JPEG / TIFF) the tiles.
    test_dir
        Optional second folder with the same classes used as the official test split
        (CRC-VAL-HE-7K beside NCT-CRC-HE-100K); ``path`` then gives train and val.

    Raises
    ------
    DataError
        If the folder has no class subfolders, a class folder holds no image, or the
        test folder has a class the training folder lacks.
    """
    path = Path(path)
    parts = [(path, "train")] + ([(Path(test_dir), "test")] if test_dir else [])
    keys, labels, groups, splits, paths = [], [], [], [], []
    train_classes: set[str] = set()
    for root, split in parts:
        if not root.is_dir():
            raise DataError("tile folder does not exist", file=root)
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(
                "tile folder has no class subfolders (expected FOLDER/<class>/<image>)", file=root
            )
        for cdir in classes:
            images = _images_in(cdir)
            if not images:
                raise DataError(
                    f"class folder {cdir.name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                    file=cdir,
                )
            if split == "test" and cdir.name not in train_classes:
                raise DataError(f"test class {cdir.name!r} is not a class of {path}", file=cdir)
            if split == "train":
                train_classes.add(cdir.name)
            for img in images:
                keys.append(
                    f"{split}/{cdir.name}/{img.name}" if test_dir else f"{cdir.name}/{img.name}"
                )
                labels.append(cdir.name)
                groups.append(_group_of(img.name))
                splits.append(split)
                paths.append(str(img))
    listing = [f"{k}:{Path(p).stat().st_size}" for k, p in zip(keys, paths, strict=True)]
    return TileSet(
        source=path,
        keys=np.array(keys),
        labels=np.array(labels),
        groups=np.array(groups),
        splits=np.array(splits) if test_dir else None,
        kind="folders",
        paths=np.array(paths),
        data_hash=json_hash(listing),
    )


def read_pcam(path: str | Path) -> TileSet:
    """PatchCamelyon: ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` pairs.

    ``x`` holds ``(N, 96, 96, 3)`` uint8 tiles, ``y`` the ``(N, 1, 1, 1)`` labels (1 =
    metastatic tissue in the centre 32×32 px). The official splits are kept (valid → val).
    """
    import h5py

    path = Path(path)
    files = {PCAM_RE.search(p.name).groups(): p for p in path.iterdir() if PCAM_RE.search(p.name)}
    if not files:
        raise DataError("no camelyonpatch_level_2_split_*_x.h5 files here", file=path)
    keys, labels, splits = [], [], []
    h5_files: dict[str, tuple[Path, int]] = {}
    for split in ("train", "valid", "test"):
        if (split, "x") not in files and (split, "y") not in files:
            continue
        if (split, "x") not in files or (split, "y") not in files:
            missing = "x" if (split, "x") not in files else "y"
            raise DataError(f"PatchCamelyon {split} split lacks its {missing} file", file=path)
        xp, yp = files[(split, "x")], files[(split, "y")]
        try:
            with h5py.File(xp, "r") as hx, h5py.File(yp, "r") as hy:
                n, shape, dtype = hx["x"].shape[0], hx["x"].shape, hx["x"].dtype
                y = np.asarray(hy["y"][:]).reshape(-1)
        except (OSError, KeyError) as exc:
            raise DataError(f"cannot read PatchCamelyon files: {exc}", file=xp) from exc
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise DataError(
                f"'x' must be (N, H, W, 3) uint8, not {shape} {dtype}", file=xp, column="x"
            )
        if len(y) != n:
            raise DataError(f"{len(y)} labels for {n} tiles", file=yp, column="y")
        name = "val" if split == "valid" else split
        h5_files[name] = (xp, n)
        keys.extend(f"{name}:{i}" for i in range(n))
        labels.extend(np.where(y > 0, "tumor", "normal").tolist())
        splits.extend([name] * n)
    keys_arr = np.array(keys)
    listing = {k: (str(p.name), n, p.stat().st_size) for k, (p, n) in h5_files.items()}
    return TileSet(
        source=path,
        keys=keys_arr,
        labels=np.array(labels),
        groups=keys_arr,
        splits=np.array(splits),
        kind="pcam",
        h5_files=h5_files,
        data_hash=json_hash(listing),
    )


def read_mhist(path: str | Path) -> TileSet:
    """MHIST: ``annotations.csv`` (Image Name, Majority Vote Label, Partition) + ``images/``."""
    import polars as pl

    path = Path(path)
    csv = path / MHIST_CSV
    try:
        table = pl.read_csv(csv)
    except Exception as exc:
        raise DataError(f"cannot read MHIST annotations: {exc}", file=csv) from exc
    for col in ("Image Name", "Majority Vote Label", "Partition"):
        if col not in table.columns:
            raise DataError(f"MHIST annotations lack column {col!r}", file=csv, column=col)
    image_dir = path / "images" if (path / "images").is_dir() else path
    names = table["Image Name"].cast(pl.Utf8).to_numpy().astype(str)
    # An image name is a path inside the data set: '..', absolute or a link out is refused.
    from healthfm.fsutil import confined

    paths = np.array(
        [
            str(confined(image_dir, n, "image name", file=csv, column="Image Name", row=i))
            for i, n in enumerate(names)
        ]
    )
    exists = np.array([Path(p).is_file() for p in paths])
    if not exists.all():
        bad = int(np.flatnonzero(~exists)[0])
        raise DataError(
            f"image {names[bad]!r} listed in the annotations is missing",
            file=csv,
            column="Image Name",
            row=bad,
        )
    part = table["Partition"].cast(pl.Utf8).str.to_lowercase().to_numpy().astype(str)
    if not np.isin(part, ["train", "test"]).all():
        bad = int(np.flatnonzero(~np.isin(part, ["train", "test"]))[0])
        raise DataError(
            f"Partition must be train or test, not {part[bad]!r}",
            file=csv,
            column="Partition",
            row=bad,
        )
    return TileSet(
        source=path,
        keys=names,
        labels=table["Majority Vote Label"].cast(pl.Utf8).to_numpy().astype(str),
        groups=names,
        splits=part,
        kind="mhist",
        paths=paths,
        data_hash=sha256_file(csv),
    )


def read_tile_set(path: str | Path, test_dir: str | Path | None = None) -> TileSet:
    """Read a tile set, recognising PatchCamelyon and MHIST layouts, else class folders."""
    path = Path(path)
    if path.is_dir() and any(PCAM_RE.search(p.name) for p in path.iterdir()):
        return read_pcam(path)
    if path.is_dir() and (path / MHIST_CSV).is_file():
        return read_mhist(path)
    return read_class_folders(path, test_dir)


def slide_tile_set(
    h5_paths: list[Path],
    slide_paths: list[Path],
    slide_mpp: float | None = None,
    labels: dict[str, str] | None = None,
) -> TileSet:
    """The tiles of tiled slides (one Trident HDF5 per slide) as one set.

    Tiles are grouped by slide region (blocks of 8 × 8 tiles) for splitting; pass
    ``labels`` ({slide stem: label}) to label every tile with its slide's label.
    """
    from healthfm.pathology.reader import open_slide
    from healthfm.pathology.tiling import SlideTiles, read_tiles_h5

    keys, groups, index, slides, tile_labels = [], [], [], [], []
    offset = 0
    hashes = []
    for s, (h5, sp) in enumerate(zip(h5_paths, slide_paths, strict=True)):
        grid, _ = read_tiles_h5(h5)
        dataset = SlideTiles(open_slide(sp, mpp=slide_mpp), grid)
        slides.append((dataset, offset))
        stem = Path(sp).stem
        keys.extend(f"{stem}:{x}_{y}" for x, y in grid.coords)
        # Split unit: a block of about 8 × 8 tiles, so that one slide still yields
        # spatially separate train / val / test regions for pretraining.
        block = 8 * int(grid.attrs.get("patch_size_level0", 256))
        bx, by = grid.coords[:, 0] // block, grid.coords[:, 1] // block
        groups.extend(
            np.char.add(np.char.add(f"{stem}:", bx.astype(str)), np.char.add("_", by.astype(str)))
        )
        index.extend([s] * len(grid))
        if labels is not None:
            tile_labels.extend([labels.get(stem, "")] * len(grid))
        offset += len(grid)
        hashes.append((stem, Path(sp).stat().st_size, grid.coords.tobytes().hex()[:64], len(grid)))
    return TileSet(
        source=Path(slide_paths[0]).parent,
        keys=np.array(keys),
        labels=np.array(tile_labels) if labels is not None else None,
        groups=np.array(groups),
        splits=None,
        kind="slides",
        slides=slides,
        slide_index=np.array(index, dtype=np.int64),
        data_hash=json_hash(hashes),
    )
