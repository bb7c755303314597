"""Reading whole-slide images (SVS, pyramidal TIFF) region by region, and tile images.

Slides are read through ``tifffile`` (``imagecodecs`` decodes the JPEG / JPEG 2000 / LZW
tiles): a region read decodes only the TIFF tiles (or strips) that overlap it, so the
full-resolution plane is never loaded. When ``openslide`` imports, it is offered as a
second back end for the other vendor formats (``.mrxs``, ``.ndpi``, ``.scn`` ...).

Physical size comes from the file: the Aperio ``MPP`` / ``AppMag`` fields of an SVS
ImageDescription, else the TIFF ``XResolution`` / ``ResolutionUnit`` tags.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import ConfigError, DataError

#: Slide suffixes read by the tifffile back end.
TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".btf", ".tf2", ".tf8")
#: Suffixes only OpenSlide reads.
OPENSLIDE_SUFFIXES = (".mrxs", ".ndpi", ".scn", ".vms", ".vmu", ".bif", ".svslide")
#: Tile-image suffixes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_MPP_RE = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")
_MAG_RE = re.compile(r"\bAppMag\s*=\s*([0-9.eE+-]+)")


@dataclass
class Level:
    """One pyramid level: its size in pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float


class Slide:
    """A whole-slide image opened for region reads.

    Use :func:`open_slide` to open one. Coordinates follow OpenSlide: ``(x, y)`` of the
    top-left corner in level-0 pixels, the size in pixels of the level read.

    Attributes
    ----------
    path
        The file.
    levels
        Pyramid levels, finest first.
    mpp
        Microns per level-0 pixel (``None`` when the file does not say).
    magnification
        Objective magnification of level 0 (``None`` when unknown).
    backend
        ``"tifffile"`` or ``"openslide"``.
    """

    path: Path
    levels: list[Level]
    mpp: float | None
    magnification: float | None
    backend: str

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.levels[0].width, self.levels[0].height

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read a ``height × width × 3`` uint8 RGB region of ``level``.

        ``(x, y)`` is the top-left corner in level-0 pixels. Parts outside the slide are
        white (as background glass).
        """
        raise NotImplementedError

    def low_res(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A low-resolution RGB view of the whole slide and its downsample from level 0."""
        raise NotImplementedError

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (+0.5%)."""
        ok = [i for i, lv in enumerate(self.levels) if lv.downsample <= downsample * 1.005]
        return max(ok, key=lambda i: self.levels[i].downsample) if ok else 0

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"Slide({self.path.name}, {w}×{h}, levels={len(self.levels)}, mpp={self.mpp}, "
            f"mag={self.magnification}, backend={self.backend})"
        )


class TiffSlide(Slide):
    """SVS / pyramidal TIFF through tifffile, decoding only the TIFF tiles a region needs."""

    backend = "tifffile"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self._pid = -1
        self._tif = None
        tif = self._open()
        try:
            if not tif.series:
                raise ValueError("no image found")
            pages = [lvl.keyframe for lvl in tif.series[0].levels]
        except Exception as exc:
            raise DataError(
                f"not a readable TIFF slide (truncated or corrupt?): {exc}", file=self.path
            ) from exc
        base = pages[0]
        _check_rgb_page(base, self.path)
        self._pages = pages
        self.levels = [
            Level(int(p.imagewidth), int(p.imagelength), base.imagewidth / p.imagewidth)
            for p in pages
        ]
        desc = base.description or ""
        self.mpp = mpp if mpp is not None else _mpp_from_tiff(base, desc)
        mag = _MAG_RE.search(desc)
        self.magnification = float(mag.group(1)) if mag else None
        # A separate low-resolution image (the SVS "Thumbnail") for tissue detection
        # when the pyramid has a single level.
        self._thumb_page = None
        for s in tif.series[1:]:
            if (s.name or "").lower() == "thumbnail":
                self._thumb_page = s.levels[0].keyframe

    def _open(self):
        import tifffile

        # One file handle per process: DataLoader workers fork and must not share one.
        if self._tif is None or self._pid != os.getpid():
            try:
                self._tif = tifffile.TiffFile(self.path)
            except FileNotFoundError as exc:
                raise DataError("slide file not found", file=self.path) from exc
            except Exception as exc:  # tifffile raises several types on corrupt headers
                raise DataError(
                    f"not a readable TIFF/SVS file (corrupt or truncated?): {exc}", file=self.path
                ) from exc
            self._pid = os.getpid()
        return self._tif

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tif"] = None
        state["_pages"] = None
        state["_thumb_page"] = None
        state["_pid"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        tif = self._open()
        self._pages = [lvl.keyframe for lvl in tif.series[0].levels]
        self._thumb_page = None
        for s in tif.series[1:]:
            if (s.name or "").lower() == "thumbnail":
                self._thumb_page = s.levels[0].keyframe

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        if self._pages is None or self._pid != os.getpid():
            # First read in a new process (a DataLoader worker): reopen the file.
            self.__setstate__(self.__getstate__())
        tif = self._tif
        ds = self.levels[level].downsample
        lx, ly = round(x / ds), round(y / ds)
        return _read_page_region(
            tif, self._pages[level], lx, ly, int(width), int(height), self.path
        )

    def low_res(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        tif = self._open()
        w0, h0 = self.dimensions
        # Prefer the coarsest pyramid level (or the SVS thumbnail) that is small enough.
        candidates = [(p, w0 / p.imagewidth) for p in self._pages]
        if self._thumb_page is not None:
            tp = self._thumb_page
            # Accept the thumbnail only if it has the slide's aspect ratio.
            if abs(tp.imagewidth / tp.imagelength - w0 / h0) < 0.02 * (w0 / h0):
                candidates.append((tp, w0 / tp.imagewidth))
        small = [c for c in candidates if max(c[0].imagewidth, c[0].imagelength) <= max_side]
        if small:
            page, ds = max(small, key=lambda c: max(c[0].imagewidth, c[0].imagelength))
            _check_rgb_page(page, self.path)
            img = _read_page_region(tif, page, 0, 0, page.imagewidth, page.imagelength, self.path)
            return img, ds
        # No small level: read the coarsest level in bands and average blocks, so memory
        # stays bounded by one band plus the output.
        idx = len(self._pages) - 1
        page = self._pages[idx]
        factor = math.ceil(max(page.imagewidth, page.imagelength) / max_side)
        out_w, out_h = page.imagewidth // factor, page.imagelength // factor
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        band = max(1, 1024 // factor) * factor
        for y in range(0, out_h * factor, band):
            h = min(band, out_h * factor - y)
            region = _read_page_region(tif, page, 0, y, out_w * factor, h, self.path)
            blocks = region.reshape(h // factor, factor, out_w, factor, 3).mean(axis=(1, 3))
            out[y // factor : (y + h) // factor] = blocks.astype(np.uint8)
        return out, self.levels[idx].downsample * factor


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads (optional back end)."""

    backend = "openslide"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import openslide

        self.path = Path(path)
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise DataError(f"OpenSlide cannot read this slide: {exc}", file=self.path) from exc
        osr = self._osr
        self.levels = [
            Level(int(w), int(h), float(d))
            for (w, h), d in zip(osr.level_dimensions, osr.level_downsamples, strict=True)
        ]
        props = osr.properties
        self.mpp = mpp if mpp is not None else _float_or_none(props.get("openslide.mpp-x"))
        self.magnification = _float_or_none(props.get("openslide.objective-power"))

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        region = self._osr.read_region((int(x), int(y)), level, (int(width), int(height)))
        rgba = np.asarray(region)
        # Transparent pixels (outside scanned areas) are background: white.
        rgb = np.where(rgba[..., 3:4] == 0, 255, rgba[..., :3]).astype(np.uint8)
        return rgb

    def low_res(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_side
        thumb = np.asarray(self._osr.get_thumbnail((max_side, max_side)).convert("RGB"))
        return thumb, w0 / thumb.shape[1] if thumb.shape[1] else scale

    def close(self) -> None:
        self._osr.close()


def openslide_available() -> bool:
    """Whether the optional OpenSlide back end imports."""
    try:
        import openslide  # noqa: F401
    except Exception:
        return False
    return True


def open_slide(path: str | Path, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image.

    Parameters
    ----------
    path
        An SVS, a (pyramidal) TIFF, or with OpenSlide installed any format it reads.
    mpp
        Microns per level-0 pixel, overriding (or supplying) the file's metadata.
    backend
        ``"auto"`` (tifffile for TIFF-based files, OpenSlide otherwise), ``"tifffile"``
        or ``"openslide"``.

    Raises
    ------
    DataError
        If the file is missing, corrupt, truncated, or not 8-bit RGB.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("slide file not found", file=path)
    suffix = path.suffix.lower()
    if backend not in ("auto", "tifffile", "openslide"):
        raise ConfigError(f"backend must be auto, tifffile or openslide, not {backend!r}")
    if backend == "openslide" or (backend == "auto" and suffix not in TIFF_SUFFIXES):
        if not openslide_available():
            raise DataError(
                f"{suffix or 'this'} slides need OpenSlide: pip install openslide-python openslide-bin",
                file=path,
            )
        return OpenSlideSlide(path, mpp)
    return TiffSlide(path, mpp)


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _mpp_from_tiff(page: Any, description: str) -> float | None:
    found = _MPP_RE.search(description)
    if found:
        return _float_or_none(found.group(1))
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not num or not den:
        return None
    per_unit = num / den
    # 2 = inch, 3 = centimetre; 1 (none) says nothing physical.
    microns = {2: 25400.0, 3: 10000.0}.get(unit)
    return microns / per_unit if microns else None


def _check_rgb_page(page: Any, path: Path) -> None:
    spp = int(page.samplesperpixel)
    bits = page.bitspersample
    bits = int(bits[0] if isinstance(bits, tuple) else bits)
    if spp != 3 or bits != 8:
        kind = {1: "greyscale", 2: "greyscale+alpha", 4: "RGBA"}.get(spp, f"{spp}-channel")
        raise DataError(
            f"slide must be 8-bit RGB; this one is {kind}, {bits}-bit",
            file=path,
            column="SamplesPerPixel",
        )


def _read_page_region(
    tif: Any, page: Any, x: int, y: int, w: int, h: int, path: Path
) -> np.ndarray:
    """Decode the TIFF tiles/strips of ``page`` overlapping a region; white outside."""
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    W, H = int(page.imagewidth), int(page.imagelength)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return out
    if page.is_tiled:
        tw, th = int(page.tilewidth), int(page.tilelength)
    else:
        tw, th = W, int(page.rowsperstrip or H)
    across = -(-W // tw)
    fh = tif.filehandle
    size = fh.size
    for r in range(y0 // th, (y1 - 1) // th + 1):
        for c in range(x0 // tw, (x1 - 1) // tw + 1):
            index = r * across + c
            offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
            where = f"tile at level pixel (x={c * tw}, y={r * th})"
            if count == 0:
                continue  # sparse tile: background
            if offset + count > size:
                raise DataError(
                    "file is truncated: this tile lies past the end of the file",
                    file=path,
                    row=where,
                )
            fh.seek(offset)
            data = fh.read(count)
            try:
                tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
            except Exception as exc:
                raise DataError(
                    f"cannot decode this tile (corrupt data?): {exc}", file=path, row=where
                ) from exc
            if tile is None:
                raise DataError("cannot decode this tile", file=path, row=where)
            tile = np.asarray(tile).reshape(-1, tile.shape[-2], tile.shape[-1])[..., :3]
            ty, tx = r * th, c * tw
            # Intersection of this tile with the requested region (tile may overhang the image).
            sy0, sy1 = max(y0, ty), min(y1, ty + tile.shape[0], H)
            sx0, sx1 = max(x0, tx), min(x1, tx + tile.shape[1], W)
            if sy1 > sy0 and sx1 > sx0:
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx
                ]
    return out


# ---------------------------------------------------------------------------- tile images


def read_image(path: str | Path) -> np.ndarray:
    """Read a tile image as an ``H × W × 3`` uint8 RGB array.

    PNG / JPEG / BMP through Pillow, TIFF through tifffile.

    Raises
    ------
    DataError
        If the file cannot be decoded, or is greyscale, RGBA, palette or not 8-bit.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path, key=0)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode not in ("RGB",):
                    raise DataError(
                        f"image must be 8-bit RGB; this one has mode {im.mode!r} "
                        f"({_MODE_WORDS.get(im.mode, 'not RGB')})",
                        file=path,
                    )
                arr = np.array(im)  # writable copy
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError("image file not found", file=path) from exc
    except Exception as exc:
        raise DataError(f"unreadable image (corrupt or not an image?): {exc}", file=path) from exc
    return check_tile_size(check_rgb(arr, path), path)


_MODE_WORDS = {
    "L": "greyscale",
    "LA": "greyscale+alpha",
    "RGBA": "RGBA",
    "P": "palette",
    "I;16": "16-bit greyscale",
    "I": "32-bit greyscale",
    "1": "binary",
    "CMYK": "CMYK",
}


#: A tile smaller than this a side holds no tissue structure (it is smaller than any
#: model's patch; resized to the model's input it is one colour): refused, not embedded.
MIN_TILE_SIDE = 8


def check_tile_size(arr: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Return ``arr`` unless a side is under :data:`MIN_TILE_SIDE` pixels (DataError)."""
    if arr.ndim >= 2 and min(arr.shape[:2]) < MIN_TILE_SIDE:
        raise DataError(
            f"tile is {arr.shape[1]} × {arr.shape[0]} pixels; a tile needs at least "
            f"{MIN_TILE_SIDE} pixels a side (a 1 × 1 image would be embedded as one colour)",
            file=path,
        )
    return arr


def check_rgb(arr: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Return ``arr`` if it is ``H × W × 3`` uint8, else raise a :class:`DataError`."""
    if arr.dtype != np.uint8:
        raise DataError(
            f"image must be 8-bit RGB; this one is {arr.dtype} ({arr.dtype.itemsize * 8}-bit)",
            file=path,
        )
    if arr.ndim == 2:
        raise DataError("image must be RGB; this one is greyscale", file=path)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        kind = "RGBA" if arr.ndim == 3 and arr.shape[-1] == 4 else f"shape {arr.shape}"
        raise DataError(f"image must be RGB (H × W × 3); this one is {kind}", file=path)
    return arr


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array (for atomic writes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="PNG")
    return buffer.getvalue()
