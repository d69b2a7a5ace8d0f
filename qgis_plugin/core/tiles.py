"""Which pixels to send: windows of a pixel grid, around a point or tiling an area.

Pure arithmetic (no Qt, no QGIS), so it is tested in the plain test suite. A window is always
north-up in its CRS: file rasters are read on their own pixel grid, other layers are rendered
north-up in the canvas CRS whatever the canvas rotation.

:class:`TileWindow` is the plugin's one window type: pixels ``[col0, col0 + width) x
[row0, row0 + height)`` of a grid whose pixel (0, 0) has its top-left corner at
``(origin_x, origin_y)``. Every map coordinate of a window is computed from the grid's origin
and an integer pixel offset, as GDAL computes a window's corners, so two windows of one grid
that share an edge compute it as the same float.

Both rules below are the backend's (``unigeoseg_backend.geo``), which the plugin cannot
import; they are written out here and must stay the same rule:

- a window around a point starts at ``floor(c - size / 2)`` on each axis (``c`` the point's
  continuous pixel position), shifted, not shrunk, to lie inside the grid
  (``raster_io.prompt_window``);
- tiles over an area are ``tile`` px long at a stride of ``tile - overlap``, the last one moved
  back to end at the area's edge; between two neighbours the core boundary is the middle of
  their overlap, so the cores partition the area (``tiling.axis_spans``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

from ..unigeoseg_protocol.params import Georeference

#: Overlap between neighbouring text tiles, px (the CLI's ``predict --overlap`` default).
DEFAULT_OVERLAP_PX = 64


@dataclass(frozen=True)
class TileWindow:
    """A north-up window of ``width x height`` pixels of a grid in ``crs``.

    Attributes:
        crs: the CRS as the backend reads it (an authority code or WKT; ``crs.crs_to_wire``).
        origin_x, origin_y: map coordinates of the top-left corner of the grid's pixel (0, 0).
        pixel_size: pixel width, map units (> 0).
        width, height: window size in pixels.
        col0, row0: the window's first pixel on the grid (may be negative on a grid without
            bounds, such as the canvas CRS's grid anchored at 0, 0).
        pixel_height: pixel height, map units (> 0); None for square pixels.
    """

    crs: str
    origin_x: float
    origin_y: float
    pixel_size: float
    width: int
    height: int
    col0: int = 0
    row0: int = 0
    pixel_height: float | None = None

    @property
    def dx(self) -> float:
        return self.pixel_size

    @property
    def dy(self) -> float:
        """Negative: rows go south (GDAL convention)."""
        return -(self.pixel_height if self.pixel_height is not None else self.pixel_size)

    def _x(self, col: int) -> float:
        return self.origin_x + col * self.dx

    def _y(self, row: int) -> float:
        return self.origin_y + row * self.dy

    @property
    def x0(self) -> float:
        """Map x of the window's top-left corner."""
        return self._x(self.col0)

    @property
    def y0(self) -> float:
        """Map y of the window's top-left corner."""
        return self._y(self.row0)

    @property
    def geotransform(self) -> tuple[float, float, float, float, float, float]:
        """GDAL order, north-up: what ``gdal.Translate(srcWin=...)`` gives the window."""
        return (self.x0, self.dx, 0.0, self.y0, 0.0, self.dy)

    @cached_property
    def georeference(self) -> Georeference:
        """The window's CRS and geotransform as the backend receives them: built once per
        window, whether its pixels are read from a file or rendered."""
        return Georeference(self.crs, self.geotransform)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in the window CRS."""
        return (self.x0, self._y(self.row0 + self.height), self._x(self.col0 + self.width),
                self.y0)

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Continuous (col, row) of a map point in the window; pixel (i, j) spans
        [i, i+1) x [j, j+1)."""
        return (x - self.x0) / self.dx, (y - self.y0) / self.dy

    def contains(self, x: float, y: float, margin_px: float = 0.0) -> bool:
        """Whether a map point lies inside the window (edges included), at least
        ``margin_px`` from its edges."""
        col, row = self.to_pixel(x, y)
        return (margin_px <= col <= self.width - margin_px
                and margin_px <= row <= self.height - margin_px)

    def subwindow(self, col0: int, row0: int, width: int, height: int) -> TileWindow:
        """The window of the same grid at pixel ``(col0, row0)`` of this one."""
        return replace(self, col0=self.col0 + col0, row0=self.row0 + row0, width=width,
                       height=height)

    def window_around(self, x: float, y: float, size_px: int) -> TileWindow:
        """The ``size_px`` square window centred on map point (x, y), inside this window
        (shifted to stay inside, smaller only where this window is smaller).

        Two points in the same pixel get the same window (the backend's cached embedding
        is reused).
        """
        col, row = self.to_pixel(x, y)
        col0, width = _span_around(col, size_px, self.width)
        row0, height = _span_around(row, size_px, self.height)
        return self.subwindow(col0, row0, width, height)

    def covering(self, xmin: float, ymin: float, xmax: float,
                 ymax: float) -> TileWindow | None:
        """The smallest part of this window holding the map rectangle (whole pixels), or
        None when the rectangle misses it."""
        ca, ra = self.to_pixel(xmin, ymax)
        cb, rb = self.to_pixel(xmax, ymin)
        c0 = max(0, math.floor(min(ca, cb)))
        c1 = min(self.width, math.ceil(max(ca, cb)))
        r0 = max(0, math.floor(min(ra, rb)))
        r1 = min(self.height, math.ceil(max(ra, rb)))
        if c1 <= c0 or r1 <= r0:
            return None
        return self.subwindow(c0, r0, c1 - c0, r1 - r0)


def _span_around(position: float, size: int, bound: int | None) -> tuple[int, int]:
    """(start, length) of a ``size`` span centred on a continuous ``position`` along one
    axis, inside ``[0, bound)`` (None: no bound)."""
    if size < 1:
        raise ValueError(f"a window must be at least 1 pixel, got {size}")
    start = math.floor(position - size / 2)
    if bound is None:
        return start, size
    length = min(size, bound)
    return max(0, min(start, bound - length)), length


def window_around(crs: str, x: float, y: float, pixel_size: float,
                  size_px: int) -> TileWindow:
    """A ``size_px`` window centred on (x, y) for rendered layers, on the grid of
    ``pixel_size`` pixels anchored at the CRS's origin (0, 0).

    Anchoring at the origin means two clicks in the same grid cell get identical windows,
    and a window's pixel edges never depend on where the click fell.
    """
    col0, width = _span_around(x / pixel_size, size_px, None)
    row0, height = _span_around(-y / pixel_size, size_px, None)
    return TileWindow(crs, 0.0, 0.0, pixel_size, width, height, col0, row0)


def extent_window(crs: str, extent: tuple[float, float, float, float],
                  pixel_size: float) -> TileWindow:
    """The window of ``pixel_size`` pixels covering ``extent`` (xmin, ymin, xmax, ymax) on
    a grid anchored at its top-left corner (e.g. the canvas's visible extent)."""
    xmin, ymin, xmax, ymax = extent
    width = max(1, math.ceil((xmax - xmin) / pixel_size))
    height = max(1, math.ceil((ymax - ymin) / pixel_size))
    return TileWindow(crs, xmin, ymax, pixel_size, width, height)


@dataclass(frozen=True)
class Tile:
    """A tile of :func:`tile_windows`: ``window`` is read and segmented, its polygons are
    kept inside ``core`` (a window of the same grid)."""

    window: TileWindow
    core: TileWindow


def _axis_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) along one axis: the backend's
    ``tiling.axis_spans``."""
    if size <= tile:
        return [(0, size, 0, size)]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    starts = [min(i * stride, size - tile) for i in range(n)]
    bounds = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(n - 1)] + [size]
    return [(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def tile_windows(area: TileWindow, tile_px: int,
                 overlap_px: int = DEFAULT_OVERLAP_PX) -> list[Tile]:
    """Row-major tiles of at most ``tile_px`` covering ``area``, overlapping by at least
    ``overlap_px`` (at most half a tile), so that objects on a seam appear whole in a tile.

    The cores partition the area and stay at least half the overlap inside their tile away
    from the area's edges: polygons clipped to their tile's core meet their neighbours'
    exactly on the cut lines (both sides compute a cut from the same grid offset).
    """
    if tile_px < 1:
        raise ValueError(f"the tile size must be at least 1 pixel, got {tile_px}")
    overlap = max(0, min(overlap_px, tile_px // 2))
    tiles = []
    for r0, r1, core_r0, core_r1 in _axis_spans(area.height, tile_px, overlap):
        for c0, c1, core_c0, core_c1 in _axis_spans(area.width, tile_px, overlap):
            tiles.append(Tile(area.subwindow(c0, r0, c1 - c0, r1 - r0),
                              area.subwindow(core_c0, core_r0, core_c1 - core_c0,
                                             core_r1 - core_r0)))
    return tiles
