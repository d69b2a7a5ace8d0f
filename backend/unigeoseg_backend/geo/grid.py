"""The pixel grid of a tile: CRS, affine transform and size, and moves between map and pixels.

Pixel space is continuous ``(col, row)``: pixel ``(i, j)`` (column ``i``, row ``j``) covers
``[i, i+1) x [j, j+1)``, so its centre is ``(i + 0.5, j + 0.5)`` and the whole tile is
``[0, width] x [0, height]`` (GDAL's and rasterio's "pixel is area" convention). Map
coordinates are ``(x, y)`` in the grid CRS in the traditional GIS order (east/lon, north/lat).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from affine import Affine
from pyproj import CRS

from unigeoseg_protocol.params import Georeference

from ..errors import CRSError, InvalidInputError, OutOfBoundsError
from .crs import crs_to_text, parse_crs, same_crs, transformer

logger = logging.getLogger(__name__)

#: Points per box edge (corners included) when a box is reprojected: the edges of a box in one
#: CRS are curves in another, and their extreme points need not be the corners.
BOX_EDGE_POINTS = 21


def _as_points(points: np.ndarray | list | tuple, what: str) -> np.ndarray:
    """``points`` as a float64 ``(N, 2)`` array (a single ``(2,)`` pair becomes ``(1, 2)``)."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 2:
        arr = arr[np.newaxis, :]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InvalidInputError(f"{what} must be an (N, 2) array of pairs, got shape {arr.shape}")
    return arr


def apply_affine(t: Affine, pts: np.ndarray) -> np.ndarray:
    """Apply affine ``t`` to ``(N, 2)`` points, in the same floating-point operation order as
    ``Affine.__mul__`` (``x*a + y*b + c``), so results are bit-identical to ``t * (x, y)``."""
    x, y = pts[:, 0], pts[:, 1]
    return np.column_stack((x * t.a + y * t.b + t.c, x * t.d + y * t.e + t.f))


@dataclass(frozen=True)
class TileGrid:
    """A georeferenced pixel grid.

    Attributes:
        crs: the grid CRS.
        transform: pixel ``(col, row)`` to map ``(x, y)`` in ``crs``; maps pixel *corners*
            (``transform * (0, 0)`` is the outer corner of the first pixel). Rotated and
            south-up transforms are allowed, singular ones are not.
        width: number of columns (> 0).
        height: number of rows (> 0).
    """

    crs: CRS
    transform: Affine
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise InvalidInputError(f"grid {name} must be a positive integer, got {value!r}")
        if not isinstance(self.transform, Affine):
            raise InvalidInputError(f"grid transform must be an affine.Affine, "
                                    f"got {type(self.transform).__name__}")
        if not all(math.isfinite(v) for v in self.transform[:6]):
            raise InvalidInputError(f"grid transform has non-finite terms: {self.transform!r}")
        if self.transform.determinant == 0:
            raise InvalidInputError("grid transform is singular (zero pixel area)")
        if not isinstance(self.crs, CRS):
            raise CRSError(f"grid crs must be a pyproj.CRS, got {type(self.crs).__name__}")

    @classmethod
    def from_georeference(cls, georef: Georeference, width: int, height: int) -> TileGrid:
        """The grid of a ``width x height`` tile whose ``georef`` holds a GDAL-order
        geotransform ``(x0, dx_col, dx_row, y0, dy_col, dy_row)`` and CRS text."""
        return cls(crs=parse_crs(georef.crs), transform=Affine.from_gdal(*georef.geotransform),
                   width=int(width), height=int(height))

    def to_georeference(self) -> Georeference:
        """The protocol form of this grid's CRS and transform (size not included)."""
        c, a, b, f, d, e = (float(v) for v in self.transform.to_gdal())
        return Georeference(crs=crs_to_text(self.crs), geotransform=(c, a, b, f, d, e))

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``: the shape of an array on this grid."""
        return (self.height, self.width)

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in square map units of ``crs`` (``|det(transform)|``)."""
        return abs(self.transform.determinant)

    # -- map <-> pixel -----------------------------------------------------------------------

    def to_grid_crs(self, xy: np.ndarray, src_crs: CRS | None) -> np.ndarray:
        """Reproject ``(N, 2)`` map points from ``src_crs`` (None: already in the grid CRS)
        into the grid CRS, x/y order.

        Raises:
            OutOfBoundsError: a point has no image in the grid CRS (PROJ returns inf there,
                e.g. a point on the far side of the globe for an orthographic grid).
        """
        pts = _as_points(xy, "points")
        if src_crs is None or same_crs(src_crs, self.crs):
            return pts
        x, y = transformer(src_crs, self.crs).transform(pts[:, 0], pts[:, 1])
        out = np.column_stack((np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)))
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise OutOfBoundsError(
                f"point ({pts[i, 0]:.10g}, {pts[i, 1]:.10g}) in {src_crs.name} cannot be "
                f"projected into the tile CRS {self.crs.name}",
                details={"point": pts[i].tolist(), "crs": crs_to_text(src_crs)})
        return out

    def map_to_pixel(self, xy: np.ndarray, src_crs: CRS | None = None) -> np.ndarray:
        """Continuous pixel ``(col, row)`` of map points.

        Args:
            xy: ``(N, 2)`` map ``(x, y)`` (or one ``(2,)`` pair) in ``src_crs``.
            src_crs: CRS of ``xy``; None means the grid CRS.

        Returns:
            ``(N, 2)`` float64 ``(col, row)``; ``floor`` gives the pixel index. Not bounds
            checked: see :meth:`check_inside`.
        """
        return apply_affine(~self.transform, self.to_grid_crs(xy, src_crs))

    def pixel_to_map(self, colrow: np.ndarray) -> np.ndarray:
        """Map ``(x, y)`` in the grid CRS of ``(N, 2)`` continuous pixel ``(col, row)``
        (pixel centres are at ``+0.5``). Returns ``(N, 2)`` float64."""
        return apply_affine(self.transform, _as_points(colrow, "pixel coordinates"))

    def box_to_pixel(self, box_xyxy: tuple[float, float, float, float] | np.ndarray,
                     src_crs: CRS | None = None) -> tuple[float, float, float, float]:
        """Pixel-space bounding box of a map-space box.

        Args:
            box_xyxy: ``(xmin, ymin, xmax, ymax)`` in ``src_crs``.
            src_crs: CRS of the box; None means the grid CRS.

        Returns:
            ``(col_min, row_min, col_max, row_max)``: the bounds, in continuous pixel
            coordinates, of the box outline. On a rotated or south-up grid the box is not
            axis-aligned in pixel space and this is its enclosing pixel box; when reprojected,
            each edge is sampled at :data:`BOX_EDGE_POINTS` points because it becomes a curve.
            Not bounds checked.
        """
        box = np.asarray(box_xyxy, dtype=np.float64).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise InvalidInputError(f"a box must be 4 finite numbers, got {box_xyxy!r}")
        xmin, ymin, xmax, ymax = box
        if not (xmin <= xmax and ymin <= ymax):
            raise InvalidInputError(f"a box needs xmin <= xmax and ymin <= ymax, got {box_xyxy!r}")
        if src_crs is None or same_crs(src_crs, self.crs):
            # An affine map sends the box's edges to straight lines: the corners suffice.
            outline = np.array([[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax]])
        else:
            t = np.linspace(0.0, 1.0, BOX_EDGE_POINTS)
            xs, ys = xmin + (xmax - xmin) * t, ymin + (ymax - ymin) * t
            outline = np.concatenate([
                np.column_stack((xs, np.full_like(xs, ymin))),
                np.column_stack((xs, np.full_like(xs, ymax))),
                np.column_stack((np.full_like(ys, xmin), ys)),
                np.column_stack((np.full_like(ys, xmax), ys)),
            ])
        colrow = self.map_to_pixel(outline, src_crs)
        col_min, row_min = colrow.min(axis=0)
        col_max, row_max = colrow.max(axis=0)
        return float(col_min), float(row_min), float(col_max), float(row_max)

    def check_inside(self, colrow: np.ndarray, *, what: str = "point") -> None:
        """Raise unless every pixel point lies on the tile, ``[0, width] x [0, height]``.

        Args:
            colrow: ``(N, 2)`` continuous ``(col, row)``.
            what: what the points are, for the message ("point", "box corner").

        Raises:
            OutOfBoundsError: naming the first offending point in grid-CRS map coordinates.
        """
        pts = _as_points(colrow, "pixel coordinates")
        col, row = pts[:, 0], pts[:, 1]
        # Written as "not inside" so that NaN counts as outside.
        outside = ~((col >= 0) & (col <= self.width) & (row >= 0) & (row <= self.height))
        if not outside.any():
            return
        i = int(np.flatnonzero(outside)[0])
        x, y = self.pixel_to_map(pts[i])[0]
        xmin, ymin, xmax, ymax = self.bounds()
        raise OutOfBoundsError(
            f"{what} ({x:.10g}, {y:.10g}) in {self.crs.name} lies outside the tile "
            f"(x {xmin:.10g} to {xmax:.10g}, y {ymin:.10g} to {ymax:.10g}); "
            f"it is at pixel col {col[i]:.2f}, row {row[i]:.2f} of {self.width} x {self.height}",
            details={"point": [float(x), float(y)], "crs": crs_to_text(self.crs),
                     "pixel": [float(col[i]), float(row[i])],
                     "width": self.width, "height": self.height})

    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` in the grid CRS of the tile's four outer corners."""
        corners = self.pixel_to_map(np.array([[0.0, 0.0], [self.width, 0.0],
                                              [self.width, self.height], [0.0, self.height]]))
        (xmin, ymin), (xmax, ymax) = corners.min(axis=0), corners.max(axis=0)
        return float(xmin), float(ymin), float(xmax), float(ymax)

    def window_grid(self, col_off: int, row_off: int, width: int, height: int) -> TileGrid:
        """The grid of the sub-array ``a[row_off:row_off+height, col_off:col_off+width]``.

        Raises:
            InvalidInputError: non-integer offsets or non-positive sizes.
            OutOfBoundsError: the window is not entirely on this grid.
        """
        values = (col_off, row_off, width, height)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise InvalidInputError(f"a window needs integer offsets and sizes, got {values!r}")
        if width <= 0 or height <= 0:
            raise InvalidInputError(f"a window needs a positive size, got {width} x {height}")
        if col_off < 0 or row_off < 0 or col_off + width > self.width \
                or row_off + height > self.height:
            raise OutOfBoundsError(
                f"window col {col_off}..{col_off + width}, row {row_off}..{row_off + height} "
                f"is not inside the {self.width} x {self.height} grid")
        t = self.transform
        # The window's outer corner is the parent's pixel corner (col_off, row_off); the linear
        # part is unchanged. Same as rasterio's window_transform.
        (x0, y0), = apply_affine(t, np.array([[float(col_off), float(row_off)]]))
        return TileGrid(crs=self.crs, transform=Affine(t.a, t.b, float(x0), t.d, t.e, float(y0)),
                        width=int(width), height=int(height))
