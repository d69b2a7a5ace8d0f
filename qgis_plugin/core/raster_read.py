"""Which file rasters are read raw, and which of their bands (the pixels are read by
:mod:`.raster_window`, the plugin's one raster reader)."""

from __future__ import annotations

from qgis.core import QgsMultiBandColorRenderer, QgsRasterLayer, QgsSingleBandGrayRenderer

from .raster_window import RasterWindowError, numpy_dtype, raster_grid

#: Relative difference allowed between pixel width and height for "square" pixels.
SQUARE_TOLERANCE = 1e-9


def is_file_raster(layer: QgsRasterLayer) -> bool:
    """A GDAL raster on its own north-up grid of square pixels, of data types that can be sent:
    read its values directly. Anything else (XYZ, WMS, WCS, PostGIS, virtual, rotated grids,
    non-square pixels) is rendered instead."""
    if layer.providerType() != "gdal":
        return False
    provider = layer.dataProvider()
    if provider is None or provider.xSize() <= 0 or provider.ySize() <= 0:
        return False
    if not all(numpy_dtype(provider.dataType(b)) for b in range(1, layer.bandCount() + 1)):
        return False
    try:
        grid = raster_grid(layer)
    except RasterWindowError:
        return False
    # A rotated GeoTIFF is warped by QGIS onto a grid that is not the dataset's own (the
    # grid is then not native). Oblong pixels are rendered too: click windows are square in
    # pixels, and should be square on the ground.
    window = grid.window
    return grid.native and abs(window.dx + window.dy) <= SQUARE_TOLERANCE * window.dx


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
