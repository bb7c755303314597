"""Tile-set layouts (class folders, PatchCamelyon, MHIST), splits and baselines."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from healthfm.errors import DataError
from healthfm.pathology import MODALITY
from healthfm.pathology.baselines import colour_histogram, downsampled_pixels
from healthfm.pathology.reader import read_image
from healthfm.pathology.split import stratified_pool_split, stratified_split
from healthfm.pathology.tilesets import read_class_folders, read_tile_set


def test_kather_folder(kather):
    tiles = read_class_folders(kather)
    assert len(tiles) == 24 and len(np.unique(tiles.labels)) == 8
    # Groups are the Kather source images: the three EMPTY tiles share one.
    assert len(np.unique(tiles.groups[tiles.labels == "08_EMPTY"])) == 1
    batch = tiles.load(np.array([0, 5, 23]), 64)
    assert batch.shape == (3, 64, 64, 3) and batch.dtype.is_floating_point is False
    full = tiles.load(np.array([5]), 150)[0].numpy()
    assert np.array_equal(full, read_image(tiles.paths[5]))


def test_official_test_dir(kather, tmp_path):
    test_dir = tmp_path / "val7k"
    for cls in ("01_TUMOR", "02_STROMA"):
        shutil.copytree(kather / cls, test_dir / cls)
    tiles = read_class_folders(kather, test_dir)
    assert (tiles.splits == "test").sum() == 6 and len(tiles) == 30
    shutil.copytree(kather / "03_COMPLEX", test_dir / "99_NEW")
    with pytest.raises(DataError, match="99_NEW"):
        read_class_folders(kather, test_dir)


def test_empty_class_folder(kather, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(kather, root)
    (root / "09_EXTRA").mkdir()
    with pytest.raises(DataError, match=r"09_EXTRA.*no images") as info:
        read_class_folders(root)
    assert "09_EXTRA" in str(info.value)
    with pytest.raises(DataError, match="no class subfolders"):
        read_class_folders(tmp_path / "set" / "01_TUMOR")


def test_unreadable_tile_named(kather, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(kather, root)
    (root / "02_STROMA" / "zz_broken.tif").write_bytes(b"II*\x00garbage")
    tiles = read_class_folders(root)
    bad = int(np.flatnonzero(np.char.endswith(tiles.keys.astype(str), "zz_broken.tif"))[0])
    with pytest.raises(DataError, match=r"zz_broken\.tif"):
        tiles.load(np.array([bad]), 64)


def _pcam(root, kather, splits=("train", "valid", "test")):
    root.mkdir()
    tiles = read_class_folders(kather)
    pixels = tiles.load(np.arange(24), 96).numpy()
    y = (tiles.labels == "01_TUMOR").astype(np.uint8)
    for i, split in enumerate(splits):
        sel = np.arange(i, 24, len(splits))
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as h5:
            h5["x"] = pixels[sel]
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as h5:
            h5["y"] = y[sel].reshape(-1, 1, 1, 1)
    return pixels, y


def test_pcam_layout(kather, tmp_path):
    pixels, y = _pcam(tmp_path / "pcam", kather)
    tiles = read_tile_set(tmp_path / "pcam")
    assert tiles.kind == "pcam" and len(tiles) == 24
    assert set(tiles.splits) == {"train", "val", "test"}
    idx = np.array([10, 2, 7])  # unsorted: rows come back in the asked order
    got = tiles.load(idx, 96).numpy()
    for j, i in enumerate(idx):
        split, row = tiles.keys[i].split(":")
        offset = {"train": 0, "val": 1, "test": 2}[split]
        assert np.array_equal(got[j], pixels[offset + 3 * int(row)])
        assert tiles.labels[i] == ("tumor" if y[offset + 3 * int(row)] else "normal")
    (tmp_path / "pcam" / "camelyonpatch_level_2_split_test_y.h5").unlink()
    with pytest.raises(DataError, match="test split lacks its y file"):
        read_tile_set(tmp_path / "pcam")


def test_mhist_layout(kather, tmp_path):
    root = tmp_path / "mhist"
    (root / "images").mkdir(parents=True)
    tiles = read_class_folders(kather)
    lines = [
        "Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition"
    ]
    for i, p in enumerate(tiles.paths[:8]):
        name = f"MHIST_{i:03d}.png"
        from PIL import Image

        Image.fromarray(read_image(p)).save(root / "images" / name)
        lines.append(f"{name},{'SSA' if i % 2 else 'HP'},{i % 7},{'test' if i >= 6 else 'train'}")
    (root / "annotations.csv").write_text("\n".join(lines) + "\n")
    mh = read_tile_set(root)
    assert mh.kind == "mhist" and list(mh.splits).count("test") == 2
    assert mh.load(np.arange(8), 32).shape == (8, 32, 32, 3)
    (root / "images" / "MHIST_003.png").unlink()
    with pytest.raises(DataError, match=r"MHIST_003\.png") as info:
        read_tile_set(root)
    assert info.value.row == 3


def test_stratified_split_keeps_classes_and_groups(kather):
    samples = MODALITY.read(kather, {})
    splits = MODALITY.split(samples, "healthfm", (0.7, 0.1, 0.2))
    assert np.array_equal(splits, MODALITY.split(samples, "healthfm", (0.7, 0.1, 0.2)))
    for g in np.unique(samples.groups):
        assert len(np.unique(splits[samples.groups == g])) == 1
    # Every class with two or more source images has a test tile.
    for cls in np.unique(samples.labels):
        if len(np.unique(samples.groups[samples.labels == cls])) >= 2:
            assert (splits[samples.labels == cls] == "test").any()
    y = np.repeat(np.arange(4), 10)
    s = stratified_split(y, np.arange(40), (0.7, 0.1, 0.2), "x")
    assert all((s[y == c] == "test").sum() == 2 for c in range(4))
    tr, va = stratified_pool_split(y, np.flatnonzero(s != "test"), seed=1)
    tr2, va2 = stratified_pool_split(y, np.flatnonzero(s != "test"), seed=2)
    assert set(np.unique(y[va])) == set(range(4)) and not np.array_equal(va, va2)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr2) + len(va2) == len(tr) + len(va)


def test_baseline_features(kather):
    tiles = read_class_folders(kather)
    batch = tiles.load(np.arange(24), 64)
    hist = colour_histogram(batch)
    assert hist.shape == (24, 64) and np.allclose(hist.reshape(24, 4, 16).sum(-1), 1.0)
    # Vectorized bincount equals a per-image numpy histogram.
    ref = np.histogram(batch[3, ..., 1].numpy(), bins=16, range=(0, 256))[0] / (64 * 64)
    assert np.allclose(hist[3, 16:32], ref)
    px = downsampled_pixels(batch)
    assert px.shape == (24, 192) and 0 <= px.min() and px.max() <= 1
    # Adipose (mostly white) is brighter than lymphocytes (dense nuclei).
    assert px[tiles.labels == "07_ADIPOSE"].mean() > px[tiles.labels == "04_LYMPHO"].mean()
