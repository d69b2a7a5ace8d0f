"""Read windows of a raster layer at native resolution, on its own pixel grid, for the backend.

The one raster reader of the plugin: the Processing algorithms and the interactive
controller (for file rasters) both read their tiles here.

Nothing is rendered or resampled: a window is a whole number of the layer's pixels, read band
by band with ``QgsRasterDataProvider.block`` from a *clone* of the layer's provider (a clone
may be used off the GUI thread, e.g. in a Processing algorithm), and sent with the exact GDAL
geotransform of its top-left pixel corner. Polygons the backend returns then follow the
layer's own pixel edges.

Nodata travels with the pixels: NaN in float rasters; the band's nodata value as
``RasterOptions.nodata`` for integer rasters (or, when bands disagree or user nodata ranges
are set, float pixels with NaN where a band is nodata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from qgis.core import (
    Qgis,
    QgsRasterBlockFeedback,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRasterRange,
    QgsRectangle,
)

from ..unigeoseg_protocol.params import Georeference, RasterOptions
from .crs import CrsError, crs_to_wire
from .tiles import TileWindow

# Qgis.DataType name -> numpy dtype (Int8 only exists from QGIS 3.30).
_DTYPES = {"Byte": np.uint8, "Int8": np.int8, "UInt16": np.uint16, "Int16": np.int16,
           "UInt32": np.uint32, "Int32": np.int32, "Float32": np.float32, "Float64": np.float64}
_NUMPY_DTYPES = {int(getattr(Qgis.DataType, name)): np.dtype(dtype)
                 for name, dtype in _DTYPES.items() if hasattr(Qgis.DataType, name)}


class RasterWindowError(Exception):
    """A window cannot be read (unsupported data type, provider failure, outside the raster,
    a band that does not exist)."""


def numpy_dtype(data_type) -> np.dtype | None:
    """The numpy dtype of a ``Qgis.DataType`` whose pixels can be sent, else None."""
    return _NUMPY_DTYPES.get(int(data_type))


@dataclass(frozen=True)
class RasterGrid:
    """The native pixel grid of a raster layer: north-up, ``width x height`` pixels.

    Attributes:
        window: the whole raster as a window of its grid (``col0 = row0 = 0``, CRS as sent to
            the backend); every window read from the raster is one of its subwindows.
        native: the geotransform is the dataset's own (read through GDAL, bit-exact), not
            derived from the layer extent -- which is what QGIS gives for rasters it warps
            (rotated grids) or that GDAL cannot open directly.
    """

    window: TileWindow
    native: bool = False

    @property
    def geotransform(self) -> tuple[float, float, float, float, float, float]:
        return self.window.geotransform


@dataclass(frozen=True)
class RasterTile:
    """Pixels of one window and how to tell the backend where they are.

    Attributes:
        pixels: ``H x W x C`` array (band-last), the layer's own values.
        raster: nodata handling for the backend.
        window: the window read, on the raster's grid (layer CRS).
    """

    pixels: np.ndarray
    raster: RasterOptions
    window: TileWindow

    @property
    def georeference(self) -> Georeference:
        """CRS and exact GDAL geotransform of the window (the window's own)."""
        return self.window.georeference


def _gdal_geotransform(provider: QgsRasterDataProvider, width: int, height: int):
    """The GDAL geotransform of a GDAL-provider raster read through GDAL itself (bit-exact,
    whereas the layer extent divided by the size may differ in the last bit), or None."""
    if provider.name() != "gdal":
        return None
    try:
        from osgeo import gdal
    except ImportError:
        return None
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        dataset = gdal.OpenEx(provider.dataSourceUri(), gdal.OF_RASTER | gdal.OF_READONLY)
        if dataset is None or (dataset.RasterXSize, dataset.RasterYSize) != (width, height):
            return None
        gt = tuple(float(v) for v in dataset.GetGeoTransform(can_return_null=True) or ())
    except Exception:  # noqa: BLE001 - any GDAL trouble: fall back to the extent
        return None
    finally:
        gdal.PopErrorHandler()
    if len(gt) != 6 or gt[2] != 0.0 or gt[4] != 0.0 or gt[1] <= 0 or gt[5] >= 0:
        return None  # rotated or south-up: QGIS warps it, so its grid is not GDAL's
    return gt


def raster_grid(layer: QgsRasterLayer,
                provider: QgsRasterDataProvider | None = None) -> RasterGrid:
    """The native grid of ``layer`` (``provider``: a clone of its provider to use instead)."""
    # (A cloned GDAL provider says isValid() False in QGIS 3.22, yet reads fine: check the
    # layer's own provider.)
    if layer.dataProvider() is None or not layer.dataProvider().isValid():
        raise RasterWindowError(f"raster layer {layer.name()!r} has no valid data provider")
    provider = provider or layer.dataProvider()
    width, height = provider.xSize(), provider.ySize()
    if width <= 0 or height <= 0:
        raise RasterWindowError(f"raster layer {layer.name()!r} has no pixel grid (an online "
                                f"service?): use a file raster")
    extent = provider.extent()
    gt = _gdal_geotransform(provider, width, height)
    if gt is not None:
        # Trust GDAL only when it describes the same grid as QGIS's extent.
        tolerance = 1e-6 * max(abs(gt[1]), abs(gt[5]))
        if (abs(gt[0] - extent.xMinimum()) > tolerance or abs(gt[3] - extent.yMaximum())
                > tolerance or abs(gt[0] + width * gt[1] - extent.xMaximum()) > tolerance * width):
            gt = None
    native = gt is not None
    if gt is None:
        gt = (extent.xMinimum(), extent.width() / width, 0.0,
              extent.yMaximum(), 0.0, -extent.height() / height)
    try:
        crs = crs_to_wire(layer.crs())
    except CrsError as exc:
        raise RasterWindowError(f"raster layer {layer.name()!r}: {exc}") from exc
    window = TileWindow(crs, gt[0], gt[3], gt[1], width, height,
                        pixel_height=None if gt[5] == -gt[1] else -gt[5])
    return RasterGrid(window, native=native)


def _in_ranges(values: np.ndarray, ranges: list[QgsRasterRange]) -> np.ndarray:
    """Where ``values`` fall in any of QGIS's user nodata ranges (NaN bounds are open)."""
    hit = np.zeros(values.shape, dtype=bool)
    for rng in ranges:
        lo, hi, bounds = rng.min(), rng.max(), rng.bounds()
        inside = np.ones(values.shape, dtype=bool)
        if not math.isnan(lo):
            include_min = bounds in (QgsRasterRange.BoundsType.IncludeMinAndMax,
                                     QgsRasterRange.BoundsType.IncludeMin)
            inside &= values >= lo if include_min else values > lo
        if not math.isnan(hi):
            include_max = bounds in (QgsRasterRange.BoundsType.IncludeMinAndMax,
                                     QgsRasterRange.BoundsType.IncludeMax)
            inside &= values <= hi if include_max else values < hi
        hit |= inside
    return hit


def _read_band(provider: QgsRasterDataProvider, band: int, extent: QgsRectangle, width: int,
               height: int, feedback=None) -> np.ndarray:
    if not isinstance(feedback, QgsRasterBlockFeedback):
        feedback = None  # e.g. a QgsProcessingFeedback: cancellation is checked between reads
    block = provider.block(band, extent, width, height, feedback)
    if block is None or not block.isValid() or block.isEmpty():
        raise RasterWindowError(f"could not read band {band} of the raster")
    dtype = _NUMPY_DTYPES.get(int(block.dataType()))
    if dtype is None:
        raise RasterWindowError(f"band {band} has data type {block.dataType()!r}, which cannot "
                                f"be sent as pixels (use a raster of integers or floats)")
    if (block.width(), block.height()) != (width, height):
        raise RasterWindowError(f"band {band}: got a {block.width()} x {block.height()} block "
                                f"for a {width} x {height} window")
    data = bytes(block.data())
    if len(data) != width * height * dtype.itemsize:
        raise RasterWindowError(f"band {band}: {len(data)} bytes for a {width} x {height} "
                                f"{dtype.name} window")
    return np.frombuffer(data, dtype=dtype).reshape(height, width)


def _checked_bands(bands: list[int] | None, band_count: int, name: str) -> list[int]:
    """1-based band numbers to read (None: all of them), each checked to exist."""
    if bands is None:
        return list(range(1, band_count + 1))
    bands = list(bands)
    if not bands:
        raise RasterWindowError(f"no bands to read from raster layer {name!r}")
    for band in bands:
        if isinstance(band, bool) or not isinstance(band, (int, np.integer)) \
                or not 1 <= band <= band_count:
            raise RasterWindowError(f"band {band!r} does not exist in raster layer {name!r}, "
                                    f"which has {band_count} band(s), numbered 1 to "
                                    f"{band_count}")
    return [int(band) for band in bands]


def read_window(layer: QgsRasterLayer, grid: RasterGrid, window: TileWindow,
                provider: QgsRasterDataProvider | None = None,
                feedback=None, bands: list[int] | None = None) -> RasterTile:
    """Read the pixels of ``window`` (a window of ``grid``) in ``bands``, unresampled.

    Args:
        layer: the raster layer (name and CRS).
        grid: its grid, from :func:`raster_grid`.
        window: which pixels, e.g. ``grid.window.subwindow(col0, row0, width, height)``.
        provider: the provider to read from; by default a fresh clone of the layer's
            (pass one clone for many reads off the GUI thread).
        feedback: optional QgsRasterBlockFeedback, passed to the provider (cancels a long
            read); other feedback objects are ignored.
        bands: 1-based band numbers, in the order of the window's channels; None = all.

    Raises:
        RasterWindowError: a window off the raster, a band that does not exist, an
            unreadable band or data type.
    """
    raster = grid.window
    col0, row0, width, height = window.col0, window.row0, window.width, window.height
    if window != raster.subwindow(col0, row0, width, height):
        raise RasterWindowError(f"window {col0},{row0} {width}x{height} is not on the grid "
                                f"of raster layer {layer.name()!r}")
    if width < 1 or height < 1 or col0 < 0 or row0 < 0 or col0 + width > raster.width \
            or row0 + height > raster.height:
        raise RasterWindowError(f"window {col0},{row0} {width}x{height} is not inside the "
                                f"{raster.width}x{raster.height} raster")
    if provider is None:
        provider = layer.dataProvider().clone()
        if provider is None:
            raise RasterWindowError(f"cannot clone the data provider of {layer.name()!r}")
    band_numbers = _checked_bands(bands, provider.bandCount(), layer.name())
    extent = QgsRectangle(*window.extent)
    planes, invalid_bands, nodata_values = [], [], []
    for band in band_numbers:
        values = _read_band(provider, band, extent, width, height, feedback)
        invalid = np.zeros(values.shape, dtype=bool)
        nodata = None
        if provider.sourceHasNoDataValue(band) and provider.useSourceNoDataValue(band):
            nodata = float(provider.sourceNoDataValue(band))
            if math.isnan(nodata):
                nodata = None  # NaN is nodata anyway
            else:
                invalid |= values == nodata
        if values.dtype.kind == "f":
            invalid |= ~np.isfinite(values)
        user_ranges = list(provider.userNoDataValues(band))
        if user_ranges:
            invalid |= _in_ranges(values, user_ranges)
        planes.append(values)
        invalid_bands.append(invalid)
        nodata_values.append((nodata, bool(user_ranges)))
    if not planes:
        raise RasterWindowError(f"raster layer {layer.name()!r} has no bands")
    pixels = np.stack(planes, axis=-1)
    any_invalid = any(inv.any() for inv in invalid_bands)
    options = RasterOptions()
    if any_invalid:
        shared = {value for value, _ in nodata_values}
        simple = (len(shared) == 1 and None not in shared
                  and not any(has_ranges for _, has_ranges in nodata_values))
        if pixels.dtype.kind == "f":
            pixels = pixels.copy()
            for b, invalid in enumerate(invalid_bands):
                pixels[:, :, b][invalid] = np.nan
        elif simple:
            options = RasterOptions(nodata=shared.pop())
        else:
            # Bands disagree about nodata (or user ranges are set): floats with NaN where a
            # band is nodata. 8-bit values are kept as they are (no stretch), as for uint8.
            source_dtype = pixels.dtype
            pixels = pixels.astype(np.float32 if source_dtype.itemsize <= 2 else np.float64)
            for b, invalid in enumerate(invalid_bands):
                pixels[:, :, b][invalid] = np.nan
            if source_dtype == np.uint8:
                options = RasterOptions(stretch="none")
    return RasterTile(pixels=np.ascontiguousarray(pixels), raster=options, window=window)


def read_window_around(layer: QgsRasterLayer, x: float, y: float, size_px: int,
                       grid: RasterGrid | None = None,
                       provider: QgsRasterDataProvider | None = None,
                       feedback=None, bands: list[int] | None = None) -> RasterTile:
    """The ``size_px`` window around map point (x, y) (layer CRS), shifted inside the raster
    (``TileWindow.window_around``), of ``bands`` (1-based band numbers; None = all bands).

    Raises:
        RasterWindowError: the point is outside the raster, a band does not exist, or the
            window cannot be read.
    """
    grid = grid or raster_grid(layer, provider)
    if size_px < 1:
        raise RasterWindowError(f"the tile size must be at least 1 pixel, got {size_px}")
    if not grid.window.contains(x, y):
        raise RasterWindowError(f"point ({x}, {y}) is outside the raster")
    return read_window(layer, grid, grid.window.window_around(x, y, size_px), provider,
                       feedback, bands=bands)
