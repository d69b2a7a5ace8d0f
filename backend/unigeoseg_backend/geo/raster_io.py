"""Windowed reads of GeoTIFFs (and any GDAL raster) into georeferenced tiles.

Only the window a prompt needs is read, so a 20 GB mosaic costs as much as a 1024 px tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from unigeoseg_protocol.params import Georeference, RasterOptions

from ..errors import InvalidInputError, OutOfBoundsError


@dataclass
class RasterTile:
    """Pixels read from a raster window, ready for the segmenter.

    Attributes:
        pixels: H x W x C array; float32 with NaN at nodata when the raster has a mask.
        georeference: CRS (WKT) and GDAL geotransform of exactly these pixels.
        raster: band and nodata options matching ``pixels``.
        window: the window of the source raster that was read.
    """

    pixels: np.ndarray
    georeference: Georeference
    raster: RasterOptions
    window: Window


def rgb_band_indexes(dataset: rasterio.DatasetReader) -> list[int]:
    """1-based band indexes to use as R, G, B: by colour interpretation, else the first three.

    Alpha bands are never used as colour.
    """
    interp = list(dataset.colorinterp)
    by_colour = [interp.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green,
                                               ColorInterp.blue) if c in interp]
    if len(by_colour) == 3:
        return by_colour
    colour = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha]
    return colour[:3] if len(colour) >= 3 else colour[:1]


def prompt_window(dataset: rasterio.DatasetReader, points_px: np.ndarray | None,
                  box_px: tuple[float, float, float, float] | None,
                  window_px: int = 1024) -> Window:
    """The window around the prompts: at least ``window_px`` square, clipped to the raster.

    Args:
        points_px: N x 2 continuous (col, row) in the raster's pixel grid.
        box_px: (col_min, row_min, col_max, row_max) in the same grid.
    """
    extents = []
    if points_px is not None and len(points_px):
        extents.append((points_px[:, 0].min(), points_px[:, 1].min(),
                        points_px[:, 0].max(), points_px[:, 1].max()))
    if box_px is not None:
        col_min, row_min, col_max, row_max = (float(v) for v in box_px)
        extents.append((col_min, row_min, col_max, row_max))
    if not extents:
        raise InvalidInputError("a window needs at least one point or a box")
    c0 = min(e[0] for e in extents)
    r0 = min(e[1] for e in extents)
    c1 = max(e[2] for e in extents)
    r1 = max(e[3] for e in extents)
    if c1 < 0 or r1 < 0 or c0 > dataset.width or r0 > dataset.height:
        raise OutOfBoundsError("the prompt lies outside the raster")
    margin = 64  # context around a box, so that its edges are not at the tile border
    width = max(window_px, math.ceil(c1 - c0) + 2 * margin)
    height = max(window_px, math.ceil(r1 - r0) + 2 * margin)
    col_off = math.floor((c0 + c1) / 2 - width / 2)
    row_off = math.floor((r0 + r1) / 2 - height / 2)
    # Shift (rather than shrink) the window to keep it inside the raster when possible.
    col_off = max(0, min(col_off, dataset.width - width))
    row_off = max(0, min(row_off, dataset.height - height))
    width = min(width, dataset.width - col_off)
    height = min(height, dataset.height - row_off)
    return Window(col_off, row_off, width, height)


def centre_window(dataset: rasterio.DatasetReader, window_px: int = 512) -> Window:
    """The ``window_px`` square at the raster's centre (the whole raster when it is smaller)."""
    if window_px < 1:
        raise InvalidInputError(f"the window must be at least 1 px, got {window_px}")
    width, height = min(window_px, dataset.width), min(window_px, dataset.height)
    return Window((dataset.width - width) // 2, (dataset.height - height) // 2, width, height)


def read_tile(dataset: rasterio.DatasetReader, window: Window, bands: list[int] | None = None,
              max_side_px: int = 4096) -> RasterTile:
    """Read ``window`` (at most ``max_side_px`` on its longer side, decimating by an integer).

    Args:
        bands: 1-based band indexes; None uses :func:`rgb_band_indexes`.
    """
    bands = bands or rgb_band_indexes(dataset)
    if any(b < 1 or b > dataset.count for b in bands):
        raise InvalidInputError(f"bands {bands} are not all in 1..{dataset.count}")
    factor = max(1, math.ceil(max(window.width, window.height) / max_side_px))
    out_h, out_w = math.ceil(window.height / factor), math.ceil(window.width / factor)
    data = dataset.read(bands, window=window, out_shape=(len(bands), out_h, out_w))
    mask = dataset.dataset_mask(window=window, out_shape=(out_h, out_w))
    pixels = np.moveaxis(data, 0, -1)  # C H W -> H W C
    raster = RasterOptions()
    if not mask.all():
        # Carry nodata as NaN so that it survives any band choice and stretch downstream;
        # 8-bit values then stay as they are (as they do without nodata), not stretched.
        if pixels.dtype == np.uint8:
            raster = RasterOptions(stretch="none")
        pixels = pixels.astype(np.float32)
        pixels[mask == 0] = np.nan
    transform = dataset.window_transform(window) @ Affine.scale(window.width / out_w,
                                                                window.height / out_h)
    georeference = Georeference(crs=dataset.crs.to_wkt(), geotransform=tuple(transform.to_gdal()))
    return RasterTile(pixels=np.ascontiguousarray(pixels), georeference=georeference,
                      raster=raster, window=window)
