"""Read raw pixel values of a file raster on its own grid (no rendering, no resampling)."""

from __future__ import annotations

import numpy as np
from qgis.core import (
    Qgis,
    QgsMultiBandColorRenderer,
    QgsRasterLayer,
    QgsRectangle,
    QgsSingleBandGrayRenderer,
)

from .tiles import TileWindow, window_on_grid

_DTYPES = {
    Qgis.DataType.Byte: np.uint8, Qgis.DataType.UInt16: np.uint16,
    Qgis.DataType.Int16: np.int16, Qgis.DataType.UInt32: np.uint32,
    Qgis.DataType.Int32: np.int32, Qgis.DataType.Float32: np.float32,
    Qgis.DataType.Float64: np.float64,
}


def is_file_raster(layer: QgsRasterLayer) -> bool:
    """A GDAL raster on a north-up grid: read its values directly. Anything else (XYZ, WMS,
    WCS, PostGIS, virtual, rotated grids) is rendered instead."""
    if layer.providerType() != "gdal":
        return False
    provider = layer.dataProvider()
    return provider.xSize() > 0 and provider.ySize() > 0 and \
        all(_DTYPES.get(provider.dataType(b)) for b in range(1, layer.bandCount() + 1))


def display_bands(layer: QgsRasterLayer) -> list[int]:
    """1-based bands the analyst sees: the renderer's RGB or grey band, else the first three."""
    renderer = layer.renderer()
    if isinstance(renderer, QgsMultiBandColorRenderer):
        bands = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
        if all(b > 0 for b in bands):
            return bands
    if isinstance(renderer, QgsSingleBandGrayRenderer) and renderer.grayBand() > 0:
        return [renderer.grayBand()]
    return list(range(1, min(3, layer.bandCount()) + 1))


def native_window(layer: QgsRasterLayer, x: float, y: float, tile_px: int) -> TileWindow:
    """A ``tile_px`` window around (x, y) (layer CRS) on the raster's own pixel grid."""
    extent = layer.extent()
    pixel_size = layer.rasterUnitsPerPixelX()
    return window_on_grid(layer.crs().authid() or layer.crs().toWkt(), x, y,
                          extent.xMinimum(), extent.yMaximum(), pixel_size, tile_px,
                          bounds_px=(layer.width(), layer.height()))


def read_window(layer: QgsRasterLayer, window: TileWindow,
                bands: list[int] | None = None) -> tuple[np.ndarray, float | None]:
    """Values of ``bands`` over ``window`` as ``H x W x C``, and the nodata value (if any).

    Float rasters carry nodata as NaN. Reads through a provider clone, so it is safe on a
    worker thread too.
    """
    provider = layer.dataProvider().clone()
    bands = bands or display_bands(layer)
    extent = QgsRectangle(*window.extent)
    planes, nodata = [], None
    for band in bands:
        block = provider.block(band, extent, window.width, window.height)
        dtype = _DTYPES[block.dataType()]
        raw = bytes(block.data())
        plane = np.frombuffer(raw, dtype=dtype).reshape(window.height, window.width).copy()
        if provider.sourceHasNoDataValue(band) and provider.useSourceNoDataValue(band):
            value = provider.sourceNoDataValue(band)
            if plane.dtype.kind == "f":
                plane[plane == value] = np.nan
            else:
                nodata = float(value)
        planes.append(plane)
    return np.stack(planes, axis=-1), nodata
