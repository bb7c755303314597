"""Tissue detection, tiling at a target mpp, the Trident HDF5 layout and thumbnails."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from healthfm.errors import DataError
from healthfm.pathology.reader import open_slide
from healthfm.pathology.tiling import (
    SlideTiles,
    box_fractions,
    otsu_threshold,
    plan_tiles,
    read_tiles_h5,
    tile_loader,
    tile_slide,
    tissue_mask,
    write_tiles_h5,
)

TRIDENT_ATTRS = {
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "savetodir",
}


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 500), rng.normal(0.6, 0.05, 300)]).clip(0, 1)
    thr = otsu_threshold(values)
    # Any threshold in the gap maximizes the between-class variance.
    assert values[:500].max() <= thr + 1 / 256 and thr < values[500:].min()


def test_tissue_mask_on_real_slide(svs):
    with open_slide(svs) as slide:
        low, _ = slide.low_res()
    mask = tissue_mask(low)
    # The skin section covers roughly a third of the thumbnail (checked by eye on the PNG).
    assert 0.15 < mask.mean() < 0.6
    # Glass in the top-left corner is background; the section centre is tissue.
    assert not mask[:100, :100].any()
    assert mask[550:650, 250:350].mean() > 0.9


def test_box_fractions_vectorized():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    coords = np.array([[0, 0], [50, 50], [0, 50], [25, 25]])
    frac = box_fractions(mask, coords, 50, 10.0)
    assert np.allclose(frac, [1.0, 0.0, 0.0, 0.25])


def test_plan_tiles_real_slide(svs):
    with open_slide(svs) as slide:
        grid = plan_tiles(slide, mpp=1.0, size=112, overlap=16, min_tissue=0.5)
    a = grid.attrs
    assert a["patch_size_level0"] == round(112 * 1.0 / 0.499)
    assert a["read_size"] == a["patch_size_level0"] and a["level"] == 0
    step = round((112 - 16) * 1.0 / 0.499)
    assert (grid.coords % step == 0).all()
    assert (grid.coords[:, 0] + a["patch_size_level0"] <= 2220).all()
    assert (grid.coords[:, 1] + a["patch_size_level0"] <= 2967).all()
    assert (grid.tissue_fraction >= 0.5).all() and len(grid) > 50
    assert a["target_magnification"] == pytest.approx(20 * 0.499 / 1.0)


def test_plan_tiles_reads_coarser_level(pyramid):
    path, _ = pyramid
    with open_slide(path) as slide:
        grid = plan_tiles(slide, mpp=2.0, size=64, min_tissue=0.0)
    # 2 µm/px from a 0.5 µm/px slide: level 2 (4×) holds exactly that resolution.
    assert grid.attrs["level"] == 2 and grid.attrs["read_size"] == 64
    assert grid.attrs["patch_size_level0"] == 256
    assert len(grid) == (1024 // 256) * (1536 // 256)


def test_mpp_the_slide_cannot_provide(svs):
    with open_slide(svs) as slide, pytest.raises(DataError, match="finest level") as info:
        plan_tiles(slide, mpp=0.25)
    assert "CMU-1-Small-Region.svs" in str(info.value)


def test_unknown_mpp(tmp_path, svs_pixels):
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, svs_pixels[:512, :512], tile=(256, 256), photometric="rgb")
    with open_slide(path) as slide, pytest.raises(DataError, match="--slide-mpp"):
        plan_tiles(slide, mpp=0.5)
    with open_slide(path, mpp=0.5) as slide:
        assert len(plan_tiles(slide, mpp=0.5, size=128, min_tissue=0.0)) == 16


def test_no_tissue_leaves_nothing_behind(tmp_path, pyramid_writer):
    blank = tmp_path / "glass.tif"
    pyramid_writer(blank, np.full((1024, 1024, 3), 242, np.uint8), levels=2)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no tissue found") as info:
        tile_slide(blank, out, mpp=0.5, size=128)
    assert "glass.tif" in str(info.value)
    assert not list(out.rglob("*.h5")) and not list(out.rglob("*.tmp"))


def test_tile_slide_writes_trident_h5_and_thumbnail(svs, tmp_path):
    h5_path, grid = tile_slide(svs, tmp_path, mpp=1.0, size=112)
    assert h5_path == tmp_path / "patches" / "CMU-1-Small-Region.h5"
    with h5py.File(h5_path, "r") as h5:
        assert h5["coords"].dtype == np.int64 and h5["coords"].shape == (len(grid), 2)
        assert TRIDENT_ATTRS <= set(h5["coords"].attrs)
        assert h5["coords"].attrs["patch_size"] == 112
        assert "features" not in h5
    thumb = np.asarray(Image.open(tmp_path / "thumbnails" / "CMU-1-Small-Region.png"))
    raw = np.asarray(Image.open(tmp_path / "thumbnails" / "CMU-1-Small-Region.raw.png"))
    assert thumb.shape == raw.shape == (768, 574, 3)
    assert (thumb != raw).any(axis=-1).mean() > 0.01  # the grid is drawn
    back, feats = read_tiles_h5(h5_path)
    assert feats is None and np.array_equal(back.coords, grid.coords)
    assert back.attrs["patch_size_level0"] == grid.attrs["patch_size_level0"]


def test_features_roundtrip_and_atomic_failure(svs, tmp_path):
    _, grid = tile_slide(svs, tmp_path, mpp=1.0, size=112)
    feats = np.random.default_rng(0).normal(size=(len(grid), 8)).astype(np.float32)
    path = write_tiles_h5(tmp_path / "f.h5", grid, feats, {"model_hash": "abc"})
    _, back = read_tiles_h5(path)
    assert np.array_equal(back, feats)
    with pytest.raises(ValueError):
        write_tiles_h5(tmp_path / "bad.h5", grid, feats[:-1])
    assert not (tmp_path / "bad.h5").exists() and not list(tmp_path.glob(".bad.h5*"))
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"broken\.h5"):
        read_tiles_h5(broken)


def test_slide_tiles_match_regions_with_workers(pyramid):
    path, crop = pyramid
    with open_slide(path) as slide:
        grid = plan_tiles(slide, mpp=1.0, size=64, min_tissue=0.0)
        dataset = SlideTiles(slide, grid)
        direct = dataset[np.arange(len(grid))]
        x, y = grid.coords[3]
        # Level 1 (2×) read at 64 px = a 128 px level-0 box averaged down.
        expected = crop[y : y + 128, x : x + 128].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
        assert np.abs(direct[3].numpy().astype(float) - expected).max() <= 2
        # One worker process (its own file handle) yields the same tiles in the same order.
        loaded = list(tile_loader(dataset, len(grid), 10, num_workers=1))
        assert np.array_equal(np.concatenate([b.numpy() for b in loaded]), direct.numpy())
