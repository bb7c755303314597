"""Slide and image reading on the bundled real files, and every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from healthfm.errors import DataError
from healthfm.pathology import reader
from healthfm.pathology.reader import open_slide, read_image


def test_svs_metadata_and_region_match_full_decode(svs, svs_pixels):
    with open_slide(svs) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.magnification == 20.0
        # A region straddling several 240-px JPEG tiles, and one overhanging the edge.
        region = slide.read_region(700, 1000, 0, 500, 300)
        assert np.array_equal(region, svs_pixels[1000:1300, 700:1200])
        edge = slide.read_region(2100, 2900, 0, 200, 100)
        assert np.array_equal(edge[:67, :120], svs_pixels[2900:, 2100:])
        assert (edge[67:] == 255).all() and (edge[:, 120:] == 255).all()
        low, ds = slide.low_res()
        # The SVS thumbnail page (574 × 768) stands in for a coarse level.
        assert low.shape == (768, 574, 3) and ds == pytest.approx(2220 / 574)


def test_pyramid_levels_mpp_and_level_reads(pyramid):
    path, crop = pyramid
    with open_slide(path) as slide:
        assert [lv.downsample for lv in slide.levels] == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(0.5)
        assert slide.best_level(2.5) == 1 and slide.best_level(0.9) == 0
        assert np.array_equal(slide.read_region(256, 512, 0, 300, 200), crop[512:712, 256:556])
        lvl1 = slide.read_region(256, 512, 1, 100, 50)
        expected = (
            crop[512:612, 256:456].reshape(50, 2, 100, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
        )
        assert np.abs(lvl1.astype(int) - expected.astype(int)).max() <= 1


def test_read_image_tiles(kather):
    tile = read_image(next((kather / "01_TUMOR").iterdir()))
    assert tile.shape == (150, 150, 3) and tile.dtype == np.uint8
    ihc = read_image(kather.parent / "ihc.png")
    assert ihc.shape == (512, 512, 3)


def test_truncated_svs(svs, tmp_path):
    bad = tmp_path / "truncated.svs"
    # This SVS keeps its IFDs at the end: a cut file has no image directory left.
    bad.write_bytes(svs.read_bytes()[: svs.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        open_slide(bad)
    assert "truncated.svs" in str(info.value)


def test_truncated_tile_data_names_tile(pyramid, tmp_path):
    path, _ = pyramid
    bad = tmp_path / "cut.tif"
    # tifffile writes each IFD before its tiles: the cut removes the last level's last tiles.
    bad.write_bytes(path.read_bytes()[:-3000])
    with open_slide(bad) as slide:
        slide.read_region(0, 0, 0, 1024, 1536)  # level 0 is intact
        with pytest.raises(DataError, match="truncated") as info:
            slide.read_region(0, 0, 2, 256, 384)
    assert "cut.tif" in str(info.value) and "tile at level pixel" in str(info.value)


def test_corrupt_header(tmp_path):
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(DataError, match=r"corrupt\.svs"):
        open_slide(bad)
    missing = tmp_path / "nope.svs"
    with pytest.raises(DataError, match="not found"):
        open_slide(missing)


def test_corrupt_tile_data(svs, tmp_path):
    data = bytearray(svs.read_bytes())
    with tifffile.TiffFile(svs) as tif:
        page = tif.pages[0]
        off, n = page.dataoffsets[5], page.databytecounts[5]
    data[off : off + n] = b"\x00" * n  # tile 5 is no longer a JPEG stream
    bad = tmp_path / "zeroed.svs"
    bad.write_bytes(bytes(data))
    with open_slide(bad) as slide, pytest.raises(DataError, match="tile at level pixel") as info:
        slide.read_region(0, 0, 0, 2220, 300)
    assert "zeroed.svs" in str(info.value)


def test_non_rgb_slide(tmp_path, svs_pixels):
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, svs_pixels[:512, :512, 0], tile=(256, 256))
    with pytest.raises(DataError, match=r"8-bit RGB.*greyscale"):
        open_slide(grey)
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(
        deep, svs_pixels[:256, :256].astype(np.uint16) * 257, tile=(128, 128), photometric="rgb"
    )
    with pytest.raises(DataError, match="16-bit"):
        open_slide(deep)


@pytest.mark.parametrize("mode,match", [("L", "greyscale"), ("RGBA", "RGBA"), ("I;16", "16-bit")])
def test_non_rgb_images(tmp_path, kather, mode, match):
    rgb = Image.fromarray(read_image(next((kather / "02_STROMA").iterdir())))
    path = tmp_path / f"tile_{mode.replace(';', '')}.png"
    if mode == "I;16":
        Image.fromarray(np.asarray(rgb)[..., 0].astype(np.uint16) * 257).save(path)
    else:
        rgb.convert(mode).save(path)
    with pytest.raises(DataError, match=match) as info:
        read_image(path)
    assert path.name in str(info.value)


def test_non_rgb_tiff_tiles(tmp_path):
    rgba = tmp_path / "rgba.tif"
    tifffile.imwrite(rgba, np.zeros((16, 16, 4), np.uint8), photometric="rgb", extrasamples=[2])
    with pytest.raises(DataError, match="RGBA"):
        read_image(rgba)
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.zeros((16, 16, 3), np.uint16), photometric="rgb")
    with pytest.raises(DataError, match="16-bit"):
        read_image(deep)


def test_unreadable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png"):
        read_image(bad)


def test_other_formats_need_openslide(tmp_path, monkeypatch):
    ndpi = tmp_path / "slide.ndpi"
    ndpi.write_bytes(b"\x00" * 16)
    monkeypatch.setattr(reader, "openslide_available", lambda: False)
    with pytest.raises(DataError, match="OpenSlide"):
        open_slide(ndpi)


def test_low_res_without_a_small_level_reads_in_bands(tmp_path, svs_pixels):
    # A single-level slide larger than max_side: averaged down band by band.
    image = np.ascontiguousarray(svs_pixels[:1300, :1000])
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib")
    with open_slide(path, mpp=0.5) as slide:
        low, ds = slide.low_res(max_side=500)
    assert ds == 3 and low.shape == (433, 333, 3)
    expected = image[:1299, :999].reshape(433, 3, 333, 3, 3).mean(axis=(1, 3)).astype(np.uint8)
    assert np.array_equal(low, expected)
