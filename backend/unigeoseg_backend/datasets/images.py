"""Reading dataset images and masks: one place for every reader.

* PNG / JPEG (and anything else Pillow opens) are read with Pillow, EXIF orientation applied
  as ``cv2.imread`` (the official loader) applies it.
* TIFF / GeoTIFF (``.tif``, ``.tiff``) are read with rasterio, so multi-band, 16-bit and float
  chips with nodata work.

Images come back as ``H x W x 3`` uint8 RGB: grey is repeated, alpha dropped, 8-bit data kept
as is; anything else (16-bit, float) goes through the backend's own conversion
(:func:`..geo.pixels.to_rgb8`): first three bands (one band repeated), each stretched from
its 2nd to its 98th percentile of valid pixels to 0..255, nodata and NaN -> 0. That is
deterministic: the same file always gives the same bytes.

Masks come back as their raw single-channel values (``H x W``), then a dataset's rule
(:func:`binarise`) turns them into the ``H x W`` bool foreground. A colour mask is turned into
grey by its luma, as ``cv2.imread(path, IMREAD_GRAYSCALE)`` does in the official loaders.

Any failure to read raises :class:`SampleReadError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image, ImageOps
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from unigeoseg_protocol.params import RasterOptions

from ..errors import UniGeoSegError
from ..geo.pixels import to_rgb8
from .base import DatasetError, SampleProblem, SampleReadError

TIFF_SUFFIXES = (".tif", ".tiff")

#: ``mask_rule`` values of :func:`..open_dataset`.
MASK_RULES = ("official", "robust")

#: Binarisation rules (see docs/datasets.md):
#: ``official255``: raw 255 or 1 (official: ``mask[mask == 255] = 1``, the rest left as is;
#: its IoU counts a raw 1 as foreground and any other value as not-foreground);
#: ``over127``: raw > 127 (robust against JPEG-ish or resampled masks);
#: ``nonzero``: raw != 0 (EarthReason, official); ``positive``: raw > 0 (local layout).
BINARISE_RULES = ("official255", "over127", "nonzero", "positive")

# Pillow modes that carry more than 8 bits in one channel.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def check_mask_rule(mask_rule: str) -> str:
    """``mask_rule`` if it is one of :data:`MASK_RULES`, else DatasetError."""
    if mask_rule not in MASK_RULES:
        raise DatasetError(f"mask_rule must be one of {', '.join(MASK_RULES)}, "
                           f"got {mask_rule!r}")
    return mask_rule


def is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def read_rgb(path: Path) -> np.ndarray:
    """The image at ``path`` as C-contiguous ``H x W x 3`` uint8 RGB.

    Raises:
        SampleReadError: missing, unreadable or corrupt file, or no valid pixel (message
            names the file).
    """
    path = Path(path)
    if is_tiff(path):
        bands, nodata = _read_raster(path)
        return _bands_to_rgb(path, bands, nodata)
    with _read_errors(path, "image"):
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in _WIDE_MODES:
                return _bands_to_rgb(path, np.asarray(image)[np.newaxis], None)
            return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def read_mask_values(path: Path) -> np.ndarray:
    """The mask at ``path`` as its raw ``H x W`` values (uint8 for 8-bit files).

    TIFF: the first band (luma of the first three for an 8-bit colour TIFF); nodata and NaN
    pixels read as 0. Others: Pillow's grey (``L``) conversion, palette applied; 16-bit and
    float greys are kept as they are.
    """
    path = Path(path)
    if is_tiff(path):
        bands, nodata = _read_raster(path)
        if bands.shape[0] >= 3 and bands.dtype == np.uint8:
            values = _luma(bands[:3])
            invalid = np.any(bands[:3] == nodata, axis=0) if nodata is not None else None
        else:
            values = bands[0].copy()
            invalid = _invalid(values, nodata)
        if invalid is not None:
            values[invalid] = 0
        return values
    with _read_errors(path, "mask"):
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in _WIDE_MODES or image.mode == "L":
                values = np.array(image)
            else:
                values = np.array(image.convert("L"))
    if values.dtype.kind == "f":
        values[~np.isfinite(values)] = 0
    return values


def binarise(values: np.ndarray, rule: str) -> np.ndarray:
    """``H x W`` bool foreground of raw mask values under one of :data:`BINARISE_RULES`."""
    if rule == "official255":
        return (values == 255) | (values == 1)
    if rule == "over127":
        return values > 127
    if rule == "nonzero":
        return values != 0
    if rule == "positive":
        return values > 0
    raise ValueError(f"unknown binarisation rule {rule!r}")


def read_mask(path: Path, rule: str) -> np.ndarray:
    """``H x W`` bool foreground of the mask file at ``path`` (see :func:`binarise`)."""
    return binarise(read_mask_values(path), rule)


def missing_problems(where: str, paths: Iterable[Path]) -> list[SampleProblem]:
    """One SampleProblem per path in ``paths`` that is not a file (a cheap stat each)."""
    return [SampleProblem(where, f"missing file {p}") for p in paths if not Path(p).is_file()]


# -- internals ----------------------------------------------------------------------------

@contextmanager
def _read_errors(path: Path, what: str) -> Iterator[None]:
    """Turns Pillow's, rasterio's and numpy's exceptions into SampleReadError naming the file."""
    try:
        yield
    except SampleReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            RasterioError) as exc:
        raise SampleReadError(f"cannot read {what} {path}: {exc}",
                              details={"path": str(path)}) from exc


def _read_raster(path: Path) -> tuple[np.ndarray, float | None]:
    """All bands of a raster as ``C x H x W`` and its nodata value."""
    with _read_errors(path, "raster"), warnings.catch_warnings():
        # Plain (non-geo) TIFFs such as RefSegRS's are fine here.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as dataset:
            return dataset.read(), dataset.nodata


def _bands_to_rgb(path: Path, bands: np.ndarray, nodata: float | None) -> np.ndarray:
    """``C x H x W`` bands -> ``H x W x 3`` uint8: first three bands (one band repeated),
    8-bit kept, wider data percentile-stretched per band, nodata/NaN -> 0."""
    pixels = np.moveaxis(bands, 0, -1)
    # Explicit bands: a 4-band uint8 chip is R, G, B + something (alpha or NIR), never
    # "RGBA with alpha as validity" as a QGIS render would be.
    options = RasterOptions(bands=(0, 1, 2) if pixels.shape[2] >= 3 else (0,), nodata=nodata)
    try:
        rgb, _valid = to_rgb8(pixels, options)
    except UniGeoSegError as exc:
        raise SampleReadError(f"cannot convert image {path} to 8-bit RGB: {exc}",
                              details={"path": str(path)}) from exc
    return rgb


def _invalid(values: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """``H x W`` bool of nodata / non-finite pixels, or None when there can be none."""
    invalid = None
    if values.dtype.kind == "f":
        invalid = ~np.isfinite(values)
    if nodata is not None and not np.isnan(nodata):
        hit = values == nodata
        invalid = hit if invalid is None else invalid | hit
    return invalid


def _luma(rgb: np.ndarray) -> np.ndarray:
    """``H x W`` uint8 grey of ``3 x H x W`` uint8 RGB, ITU-R 601 weights rounded as
    OpenCV's ``COLOR_RGB2GRAY`` (14-bit fixed point)."""
    r, g, b = (c.astype(np.uint32) for c in rgb)
    return ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14).astype(np.uint8)
