"""Checks the geo tests share: polygons burned back onto a tile grid."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import rasterio.features
import shapely

from unigeoseg_backend.geo.grid import TileGrid


def rasterize_polygons(geoms: Iterable[shapely.Geometry], grid: TileGrid) -> np.ndarray:
    """``grid.height x grid.width`` bool mask of the pixels whose centre lies in a geometry
    (GDAL's default rule, the inverse of ``mask_to_polygons``). ``geoms`` are in the grid
    CRS."""
    shapes = [(g, 1) for g in geoms if g is not None and not g.is_empty]
    if not shapes:
        return np.zeros(grid.shape, dtype=bool)
    burned = rasterio.features.rasterize(shapes, out_shape=grid.shape, transform=grid.transform,
                                         fill=0, dtype=np.uint8, all_touched=False)
    return burned.astype(bool)
