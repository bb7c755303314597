"""Fixtures of the pathology tests: the bundled real files and small derived slides."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from healthfm.datasets import data_path


@pytest.fixture(scope="session")
def svs():
    """The bundled Aperio slide (real H&E, 2220 × 2967 px, JPEG tiles, 0.499 µm/px)."""
    return data_path("pathology", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def kather():
    """The bundled 24 Kather 2016 tiles (8 classes × 3)."""
    return data_path("pathology", "kather2016_samples")


@pytest.fixture(scope="session")
def svs_pixels(svs):
    """Level 0 of the bundled slide decoded whole (only tests do this, to compare)."""
    return tifffile.imread(svs, key=0)


def write_pyramid(
    path,
    image: np.ndarray,
    mpp: float = 0.5,
    levels: int = 3,
    tile: int = 128,
    compression: str | None = "jpeg",
) -> None:
    """Write a tiled pyramidal TIFF (SubIFDs, 2× per level) with resolution tags."""
    res = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path) as tif:
        kw = dict(tile=(tile, tile), compression=compression, photometric="rgb")
        tif.write(image, subifds=levels - 1, resolution=res, resolutionunit="CENTIMETER", **kw)
        for k in range(1, levels):
            f = 2**k
            h, w = image.shape[0] // f, image.shape[1] // f
            small = (
                image[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3)).astype(np.uint8)
            )
            tif.write(
                small,
                subfiletype=1,
                resolution=(res[0] / f, res[1] / f),
                resolutionunit="CENTIMETER",
                **kw,
            )


@pytest.fixture(scope="session")
def pyramid_writer():
    """The :func:`write_pyramid` helper."""
    return write_pyramid


@pytest.fixture(scope="session")
def pyramid(tmp_path_factory, svs_pixels):
    """A 3-level pyramidal TIFF (lossless) cut from the real slide: 1024 × 1536 px at 0.5 µm/px."""
    path = tmp_path_factory.mktemp("pyr") / "crop.tif"
    crop = np.ascontiguousarray(svs_pixels[1200:2736, 400:1424])
    write_pyramid(path, crop, compression="zlib")
    return path, crop
