"""Masks on a tile grid to polygons in map coordinates, reprojection and GeoJSON.

Polygons trace pixel edges exactly: a mask pixel ``(col, row)`` becomes the quadrilateral with
corners ``transform * (col, row)``, ``transform * (col + 1, row)``, ... so that rasterising
the polygons back on the same grid (pixel-centre rule) reproduces the mask.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS
from shapely.geometry import mapping
from shapely.geometry.polygon import orient

from ..errors import BadFrameError, CRSError, InvalidInputError
from .crs import crs_to_text, same_crs, transformer
from .grid import TileGrid, apply_affine

logger = logging.getLogger(__name__)


# -- mask -> polygons ------------------------------------------------------------------------

def _foreground(mask: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """``H x W`` bool: mask set and (when given) valid."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.size == 0:
        shape = getattr(mask, "shape", None)
        raise BadFrameError(f"a mask must be a non-empty H x W array, got shape {shape}")
    if mask.dtype == np.bool_:
        fg = mask.copy() if valid is not None else mask
    elif mask.dtype == np.uint8:
        fg = mask != 0
    else:
        raise BadFrameError(f"a mask must be bool or uint8, got {mask.dtype}")
    if valid is not None:
        if not isinstance(valid, np.ndarray) or valid.shape != mask.shape:
            raise BadFrameError(f"valid must be a bool array of the mask's shape {mask.shape}, "
                                f"got {getattr(valid, 'shape', None)}")
        np.logical_and(fg, valid.astype(bool, copy=False), out=fg)
    return fg


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove the vertices of a closed rectilinear pixel-space ring that sit in the middle of a
    straight run (and repeated vertices), and close it again.

    Pixel-edge rings have only horizontal and vertical edges on integer coordinates, so the
    test is exact. Recent GDAL already emits corners only; older versions emit a vertex at every
    pixel corner, and callers (and exact comparisons) should not depend on which.
    """
    pts = ring[:-1]
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    straight = (((prev[:, 0] == pts[:, 0]) & (pts[:, 0] == nxt[:, 0]))
                | ((prev[:, 1] == pts[:, 1]) & (pts[:, 1] == nxt[:, 1])))
    kept = pts[~straight]
    return np.concatenate([kept, kept[:1]])


def _ring_area(ring: np.ndarray) -> float:
    """Unsigned shoelace area of a closed ring; exact for integer pixel coordinates."""
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0


def mask_to_polygons(mask: np.ndarray, transform: Affine, *, simplify: float = 0.0,
                     min_area: float = 0.0, valid: np.ndarray | None = None,
                     max_polygons: int = 10000) -> list[shapely.Polygon]:
    """Polygons (with holes) of the 4-connected regions of a mask, in the grid's map units.

    Args:
        mask: ``H x W`` bool, or uint8 where non-zero is foreground.
        transform: pixel ``(col, row)`` to map ``(x, y)`` of the mask's grid (pixel corners).
        simplify: topology-preserving simplification tolerance in map units of the grid CRS;
            0 keeps the exact pixel outline.
        min_area: drop polygons whose exact pixel area (pixel count x pixel area, holes
            excluded, before simplification) is below this, in square map units.
        valid: ``H x W`` bool; pixels where it is False count as background.
        max_polygons: the most polygons (after ``min_area``) accepted.

    Returns:
        Polygons in the grid CRS in raster scan order, exteriors counter-clockwise and holes
        clockwise in map coordinates (RFC 7946), whatever the sign of the transform. Vertices
        are the outline's corners only, each ``transform * (col, row)`` computed exactly as
        ``Affine.__mul__`` does. Regions touching only at a pixel corner are separate polygons.

    Raises:
        BadFrameError: mask (or valid) of the wrong shape or dtype.
        InvalidInputError: a singular or non-finite transform, a negative tolerance or area,
            or more than ``max_polygons`` polygons (a salt-and-pepper mask: raise ``min_area``).
    """
    if not isinstance(transform, Affine) or not all(math.isfinite(v) for v in transform[:6]) \
            or transform.determinant == 0:
        raise InvalidInputError(f"the mask transform must be a finite, non-singular Affine, "
                                f"got {transform!r}")
    if not (simplify >= 0 and min_area >= 0):
        raise InvalidInputError("simplify and min_area must be >= 0")
    fg = _foreground(mask, valid)
    if not fg.any():
        return []
    pixel_area = abs(transform.determinant)

    polygons: list[shapely.Polygon] = []
    # Polygonise in pixel space (identity transform): vertices are exact integers there, which
    # makes the collinearity and area tests exact; the grid transform is applied afterwards.
    for geom, _ in rasterio.features.shapes(fg.view(np.uint8), mask=fg, connectivity=4):
        rings = [_drop_collinear(np.asarray(r, dtype=np.float64)) for r in geom["coordinates"]]
        n_pixels = _ring_area(rings[0]) - sum(_ring_area(r) for r in rings[1:])
        if n_pixels * pixel_area < min_area:
            continue
        if len(polygons) >= max_polygons:
            raise InvalidInputError(
                f"the mask has more than {max_polygons} separate regions; raise min_area or "
                f"clean the mask", details={"max_polygons": max_polygons})
        rings = [apply_affine(transform, r) for r in rings]
        polygons.append(shapely.Polygon(rings[0], rings[1:]))

    if simplify > 0:
        simplified = shapely.simplify(np.asarray(polygons, dtype=object), simplify,
                                      preserve_topology=True)
        polygons = [g for g in simplified if not g.is_empty]
    return [orient(p, sign=1.0) for p in polygons]


# -- reprojection ----------------------------------------------------------------------------

def reproject_geometries(geoms: Iterable[shapely.Geometry], src_crs: CRS,
                         dst_crs: CRS) -> list[shapely.Geometry]:
    """Geometries moved vertex by vertex from ``src_crs`` to ``dst_crs`` (x/y order).

    No vertices are added, so a long straight edge stays straight in ``dst_crs`` although its
    exact image would be a curve; for pixel outlines the difference is far below a pixel.
    Polygons are re-oriented (exterior counter-clockwise) since some projections mirror.
    Returns a new list; the same geometries when the CRSs are equal.

    Raises:
        CRSError: a vertex has no image in ``dst_crs`` (outside the projection's domain).
    """
    geoms = list(geoms)
    if not geoms or same_crs(src_crs, dst_crs):
        return geoms
    proj = transformer(src_crs, dst_crs)

    def _move(xy: np.ndarray) -> np.ndarray:
        x, y = proj.transform(xy[:, 0], xy[:, 1])
        out = np.column_stack((np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)))
        if not np.isfinite(out).all():
            raise CRSError(f"geometries in {src_crs.name} cannot be reprojected to "
                           f"{dst_crs.name}: some vertices fall outside its domain",
                           details={"crs": crs_to_text(dst_crs)})
        return out

    moved = shapely.transform(np.asarray(geoms, dtype=object), _move)
    return [orient(g, sign=1.0) if isinstance(g, shapely.Polygon) else g for g in moved]


# -- GeoJSON ---------------------------------------------------------------------------------

def _json_value(value: Any) -> Any:
    """A property value as plain JSON: numpy scalars unwrapped, datetimes as ISO 8601."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _listify(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_listify(v) for v in value]
    return value


def _geojson_geometry(geom: shapely.Geometry) -> dict[str, Any]:
    """A GeoJSON geometry dict with plain (JSON-serialisable) nested lists."""
    if isinstance(geom, shapely.Polygon):
        return {"type": "Polygon", "coordinates": _polygon_coords(geom)}
    if isinstance(geom, shapely.MultiPolygon):
        return {"type": "MultiPolygon", "coordinates": [_polygon_coords(p) for p in geom.geoms]}
    return _listify(dict(mapping(geom)))


def _polygon_coords(poly: shapely.Polygon) -> list:
    if poly.is_empty:
        return []
    return [np.asarray(r.coords)[:, :2].tolist() for r in (poly.exterior, *poly.interiors)]


def feature_collection(geoms: Sequence[shapely.Geometry],
                       properties: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None,
                       crs: CRS) -> dict[str, Any]:
    """A GeoJSON FeatureCollection (plain dicts and lists, ready for ``json.dumps``).

    Args:
        geoms: geometries in ``crs``, x/y (east/lon, north/lat) order.
        properties: one dict per geometry, or one dict shared by all (None: empty).
        crs: CRS of the coordinates.

    Returns:
        ``{"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name":
        "EPSG:32633"}}, "features": [...]}``. The ``crs`` member is the 2008 GeoJSON form,
        non-standard under RFC 7946 but read by GDAL/QGIS; its name is the authority code when
        one matches exactly, else WKT. Coordinates are in ``crs`` (not necessarily WGS 84).

    Raises:
        InvalidInputError: a properties list of the wrong length, or non-finite coordinates.
    """
    geoms = list(geoms)
    if properties is None or isinstance(properties, Mapping):
        props_list = [dict(properties or {})] * len(geoms)
    else:
        props_list = list(properties)
        if len(props_list) != len(geoms):
            raise InvalidInputError(f"{len(props_list)} property dicts for {len(geoms)} "
                                    f"geometries")
    if geoms and not np.isfinite(shapely.get_coordinates(np.asarray(geoms, dtype=object))).all():
        raise InvalidInputError("geometries have non-finite coordinates")
    features = [{"type": "Feature", "geometry": _geojson_geometry(g),
                 "properties": {str(k): _json_value(v) for k, v in p.items()}}
                for g, p in zip(geoms, props_list, strict=True)]
    return {"type": "FeatureCollection",
            "crs": {"type": "name", "properties": {"name": crs_to_text(crs)}},
            "features": features}


# -- polygons -> mask ------------------------------------------------------------------------

def rasterize_polygons(geoms: Iterable[shapely.Geometry], grid: TileGrid) -> np.ndarray:
    """``grid.height x grid.width`` bool mask of the pixels whose centre lies in a geometry
    (GDAL's default rule, the inverse of :func:`mask_to_polygons`). ``geoms`` are in the grid
    CRS."""
    shapes = [(g, 1) for g in geoms if g is not None and not g.is_empty]
    if not shapes:
        return np.zeros(grid.shape, dtype=bool)
    burned = rasterio.features.rasterize(shapes, out_shape=grid.shape, transform=grid.transform,
                                         fill=0, dtype=np.uint8, all_touched=False)
    return burned.astype(bool)
