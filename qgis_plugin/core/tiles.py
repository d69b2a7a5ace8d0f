"""Which pixels to send: tile windows around clicks and over the visible extent.

Pure arithmetic on GDAL geotransforms (no Qt, no QGIS), so it is unit-tested on its own. A
window is always north-up in its CRS: file rasters are read on their own pixel grid, other
layers are rendered north-up in the canvas CRS whatever the canvas rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TileWindow:
    """A north-up grid of ``width x height`` pixels in ``crs``.

    Attributes:
        crs: authority code or WKT of the tile CRS.
        x0, y0: map coordinates of the top-left corner of pixel (0, 0).
        pixel_size: map units per pixel (square pixels).
        width, height: size in pixels.
    """

    crs: str
    x0: float
    y0: float
    pixel_size: float
    width: int
    height: int

    @property
    def geotransform(self) -> tuple[float, float, float, float, float, float]:
        """GDAL order, north-up."""
        return (self.x0, self.pixel_size, 0.0, self.y0, 0.0, -self.pixel_size)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in the tile CRS."""
        return (self.x0, self.y0 - self.height * self.pixel_size,
                self.x0 + self.width * self.pixel_size, self.y0)

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Continuous (col, row) of a map point; pixel (i, j) spans [i, i+1) x [j, j+1)."""
        return (x - self.x0) / self.pixel_size, (self.y0 - y) / self.pixel_size

    def contains(self, x: float, y: float, margin_px: float = 0.0) -> bool:
        """Whether a map point lies inside the window, at least ``margin_px`` from its edges."""
        col, row = self.to_pixel(x, y)
        return (margin_px <= col <= self.width - margin_px
                and margin_px <= row <= self.height - margin_px)


def window_on_grid(crs: str, x: float, y: float, grid_x0: float, grid_y0: float,
                   pixel_size: float, tile_px: int,
                   bounds_px: tuple[int, int] | None = None) -> TileWindow:
    """A ``tile_px`` square window centred on map point (x, y), aligned to a pixel grid.

    Args:
        crs: CRS of the point and the grid.
        grid_x0, grid_y0: top-left corner of the grid (a raster's origin), so that the window's
            pixels are the raster's own pixels: no resampling.
        pixel_size: grid pixel size, map units.
        tile_px: window side in pixels.
        bounds_px: (width, height) of the raster in grid pixels; the window is shifted to stay
            inside it, and shrunk only when the raster is smaller than the window.
    """
    col = math.floor((x - grid_x0) / pixel_size) - tile_px // 2
    row = math.floor((grid_y0 - y) / pixel_size) - tile_px // 2
    width = height = tile_px
    if bounds_px is not None:
        raster_w, raster_h = bounds_px
        width, height = min(tile_px, raster_w), min(tile_px, raster_h)
        col = max(0, min(col, raster_w - width))
        row = max(0, min(row, raster_h - height))
    return TileWindow(crs=crs, x0=grid_x0 + col * pixel_size, y0=grid_y0 - row * pixel_size,
                      pixel_size=pixel_size, width=width, height=height)


def window_around(crs: str, x: float, y: float, pixel_size: float, tile_px: int) -> TileWindow:
    """A ``tile_px`` window centred on (x, y) for rendered layers, on a grid anchored at 0, 0.

    Anchoring at the CRS origin means two clicks close together get identical windows when
    they round to the same grid cell, and a window's pixel edges never depend on the click.
    """
    return window_on_grid(crs, x, y, 0.0, 0.0, pixel_size, tile_px)


def tiles_over_extent(crs: str, extent: tuple[float, float, float, float], pixel_size: float,
                      tile_px: int, overlap_px: int = 64) -> list[TileWindow]:
    """Windows of at most ``tile_px`` covering ``extent`` (xmin, ymin, xmax, ymax), row-major,
    overlapping by ``overlap_px`` so that objects on a seam appear whole in one tile."""
    return [window for window, _ in tiles_and_cores_over_extent(crs, extent, pixel_size,
                                                                tile_px, overlap_px)]


def tiles_and_cores_over_extent(crs: str, extent: tuple[float, float, float, float],
                                pixel_size: float, tile_px: int, overlap_px: int = 64
                                ) -> list[tuple[TileWindow, tuple[float, float, float, float]]]:
    """:func:`tiles_over_extent` with each window's *core* (xmin, ymin, xmax, ymax).

    A core is its window less half the overlap on each side shared with a neighbour: the
    cores partition the covered grid, so polygons clipped to their tile's core meet their
    neighbours' exactly on the cut lines (both sides compute a cut from the same integer
    pixel position, hence the same float)."""
    xmin, ymin, xmax, ymax = extent
    total_w = max(1, math.ceil((xmax - xmin) / pixel_size))
    total_h = max(1, math.ceil((ymax - ymin) / pixel_size))
    step = max(1, tile_px - overlap_px)
    col_starts = list(range(0, max(1, total_w - overlap_px), step))
    row_starts = list(range(0, max(1, total_h - overlap_px), step))
    col_cuts = [0, *(c + overlap_px // 2 for c in col_starts[1:]), total_w]
    row_cuts = [0, *(r + overlap_px // 2 for r in row_starts[1:]), total_h]
    out = []
    for i, row in enumerate(row_starts):
        for j, col in enumerate(col_starts):
            width, height = min(tile_px, total_w - col), min(tile_px, total_h - row)
            window = TileWindow(crs=crs, x0=xmin + col * pixel_size, y0=ymax - row * pixel_size,
                                pixel_size=pixel_size, width=width, height=height)
            core = (xmin + col_cuts[j] * pixel_size, ymax - row_cuts[i + 1] * pixel_size,
                    xmin + col_cuts[j + 1] * pixel_size, ymax - row_cuts[i] * pixel_size)
            out.append((window, core))
    return out
