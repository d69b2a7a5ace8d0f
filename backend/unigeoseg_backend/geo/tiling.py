"""Whole-raster tiling and seam-free vectorisation by horizontal strips (no model here).

:func:`tile_grid` cuts a raster into overlapping tiles; each tile has a *core*, the part of
it whose mask is kept. Cores partition the raster exactly (no gaps, no overlaps), and away
from the raster's edges a core stays at least ``overlap // 2`` px inside its tile, so every
kept pixel was predicted with context on all sides.

:class:`StripPolygonizer` turns the stitched mask, fed as consecutive horizontal strips, into
the same polygons as :func:`~.vectorize.mask_to_polygons` on the whole mask at once, while
holding only one strip and the polygons still open across the last seam. Strips are
polygonised in pixel space (integer vertices, so unions and collinearity tests are exact) and
the raster's transform is applied once per finished polygon, with the same floating-point
operations as ``mask_to_polygons``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from rasterio.windows import Window

from ..errors import InvalidInputError
from .grid import apply_affine
from .vectorize import _orient_ccw, mask_to_polygons

__all__ = ["AxisSpan", "Region", "StripPolygonizer", "Tile", "axis_spans", "tile_grid"]


@dataclass(frozen=True)
class AxisSpan:
    """One tile position along an axis: the tile is ``[start, stop)``, its core
    ``[core_start, core_stop)``."""

    start: int
    stop: int
    core_start: int
    core_stop: int


@dataclass(frozen=True)
class Tile:
    """A tile of :func:`tile_grid`.

    Attributes:
        row, col: position in the grid of tiles (row-major order).
        window: the pixels read and segmented.
        core: the part of ``window`` whose mask is kept; cores partition the raster.
    """

    row: int
    col: int
    window: Window
    core: Window

    @property
    def core_in_tile(self) -> tuple[slice, slice]:
        """(rows, cols) slices of the core inside the tile's own array."""
        r0 = int(self.core.row_off - self.window.row_off)
        c0 = int(self.core.col_off - self.window.col_off)
        return (slice(r0, r0 + int(self.core.height)), slice(c0, c0 + int(self.core.width)))


def axis_spans(size: int, tile: int = 512, overlap: int = 64) -> list[AxisSpan]:
    """Tile positions along one axis of ``size`` px.

    Tiles are ``tile`` px long (one shorter tile when ``size < tile``) at a stride of
    ``tile - overlap``; the last one is moved back to end at ``size`` (it then overlaps its
    neighbour by more). Between two neighbours the core boundary is the middle of their
    overlap, i.e. ``overlap // 2`` (or more) px inside each of them.
    """
    if size < 1:
        raise InvalidInputError(f"a raster side must be at least 1 px, got {size}")
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise InvalidInputError(f"need tile >= 1 and 0 <= overlap < tile, got tile {tile}, "
                                f"overlap {overlap}")
    if size <= tile:
        return [AxisSpan(0, size, 0, size)]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    starts = [min(i * stride, size - tile) for i in range(n)]
    bounds = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(n - 1)] + [size]
    return [AxisSpan(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def tile_grid(width: int, height: int, tile: int = 512, overlap: int = 64) -> list[Tile]:
    """Row-major tiles covering a ``width x height`` raster, each with its core window.

    Raises:
        InvalidInputError: a side < 1, ``tile < 1``, or ``overlap`` not in ``0..tile-1``.
    """
    rows = axis_spans(height, tile, overlap)
    cols = axis_spans(width, tile, overlap)
    return [Tile(row=i, col=j,
                 window=Window(c.start, r.start, c.stop - c.start, r.stop - r.start),
                 core=Window(c.core_start, r.core_start, c.core_stop - c.core_start,
                             r.core_stop - r.core_start))
            for i, r in enumerate(rows) for j, c in enumerate(cols)]


# -- strips -> polygons ----------------------------------------------------------------------

@dataclass
class Region:
    """A finished polygon: ``polygon`` in map coordinates, ``pixel`` the same outline in the
    raster's pixel space (col, row; exact integers), e.g. to weigh per-tile attributes."""

    polygon: shapely.Polygon
    pixel: shapely.Polygon


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _drop_collinear_ring(coords: np.ndarray) -> np.ndarray:
    """Open ring (no closing vertex) of axis-aligned integer edges, corners only."""
    while True:
        prev = np.roll(coords, 1, axis=0)
        nxt = np.roll(coords, -1, axis=0)
        x, y = coords[:, 0], coords[:, 1]
        straight = ((prev[:, 0] == x) & (x == nxt[:, 0])) | ((prev[:, 1] == y) & (y == nxt[:, 1]))
        if not straight.any() or len(coords) - int(straight.sum()) < 3:
            return coords
        coords = coords[~straight]


def _corners_only(poly: shapely.Polygon) -> shapely.Polygon:
    """A pixel-space polygon rebuilt with its outline's corners only (unions leave a vertex
    where a seam crossed an edge)."""
    rings = [_drop_collinear_ring(np.asarray(r.coords)[:-1, :2])
             for r in (poly.exterior, *poly.interiors)]
    return shapely.Polygon(rings[0], rings[1:])


class StripPolygonizer:
    """Polygons of a mask fed as consecutive horizontal strips, merged across the seams.

    Feed the strips top to bottom with :meth:`feed` (each a ``strip_height x width`` bool
    array, the next rows of the raster); each call returns the regions that are finished
    (they do not reach the strip's bottom edge). Regions reaching the bottom edge stay open and
    are merged with the next strip's regions they share a boundary segment with (4-connected
    across the seam; a shared corner alone does not join, as in ``mask_to_polygons``).
    :meth:`finish` returns the regions still open.

    The result is the set of polygons ``mask_to_polygons(whole_mask, transform, ...)`` gives,
    with the same vertices (outline corners only, ``transform * (col, row)``) and orientation
    (exteriors counter-clockwise in map coordinates); only the order and the ring start
    vertices differ. ``min_area`` and ``simplify`` apply to the merged polygons, as they would
    to the whole mask's.

    Memory: one strip's polygons plus the open ones, whatever the raster's height.

    Args:
        transform: pixel (col, row) to map (x, y) of the whole raster.
        width: raster width in px (every strip's width).
        strip_rows: the strips' heights, when known in advance (checked on each feed; the
            total is the raster height); None accepts any heights.
        simplify, min_area: as for ``mask_to_polygons`` (map units).
        max_polygons_per_strip: cap on the regions of one strip (a salt-and-pepper guard).
    """

    def __init__(self, transform: Affine, width: int, strip_rows: Sequence[int] | None = None,
                 *, simplify: float = 0.0, min_area: float = 0.0,
                 max_polygons_per_strip: int = 1_000_000):
        if not isinstance(transform, Affine) or transform.determinant == 0 \
                or not all(math.isfinite(v) for v in transform[:6]):
            raise InvalidInputError(f"the transform must be a finite, non-singular Affine, "
                                    f"got {transform!r}")
        if width < 1:
            raise InvalidInputError(f"width must be >= 1, got {width}")
        if not (simplify >= 0 and min_area >= 0):
            raise InvalidInputError("simplify and min_area must be >= 0")
        self.transform = transform
        self.width = int(width)
        self.strip_rows = list(strip_rows) if strip_rows is not None else None
        self.simplify = float(simplify)
        self.min_area = float(min_area)
        self.max_polygons_per_strip = int(max_polygons_per_strip)
        self.row = 0           # first row of the next strip
        self.n_strips = 0
        self._open: list[shapely.Polygon] = []   # pixel space, reaching row ``self.row``
        self._last_row: np.ndarray | None = None  # the previous strip's bottom row of pixels
        self._pixel_area = abs(transform.determinant)
        self._finished = False

    @property
    def open_count(self) -> int:
        """Regions currently open across the last seam."""
        return len(self._open)

    def feed(self, mask: np.ndarray) -> list[Region]:
        """Add the next strip (``h x width`` bool, or uint8 with non-zero foreground)."""
        if self._finished:
            raise InvalidInputError("the polygonizer is finished")
        if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.shape[1] != self.width \
                or mask.shape[0] < 1:
            raise InvalidInputError(f"a strip must be h x {self.width}, got "
                                    f"{getattr(mask, 'shape', None)}")
        if self.strip_rows is not None:
            if self.n_strips >= len(self.strip_rows) \
                    or mask.shape[0] != self.strip_rows[self.n_strips]:
                raise InvalidInputError(f"strip {self.n_strips} has {mask.shape[0]} rows; "
                                        f"expected strips of {self.strip_rows} rows")
        fg = mask if mask.dtype == np.bool_ else mask != 0
        top, bottom = self.row, self.row + fg.shape[0]
        pieces = (mask_to_polygons(fg, Affine.translation(0, top),
                                   max_polygons=self.max_polygons_per_strip)
                  if fg.any() else [])
        done: list[shapely.Polygon] = []
        if self._open and pieces and self._last_row is not None:
            pieces, closed = self._merge(pieces, fg[0], top)
            done.extend(closed)
        else:
            done.extend(self._open)
            pieces = list(pieces)
        self._open = []
        for p in pieces:
            (self._open if p.bounds[3] == bottom else done).append(p)
        self.row = bottom
        self._last_row = fg[-1].copy()
        self.n_strips += 1
        if self.strip_rows is not None and self.n_strips == len(self.strip_rows):
            done.extend(self._open)
            self._open = []
            self._finished = True
        return self._regions(done)

    def finish(self) -> list[Region]:
        """The regions still open (call after the last strip)."""
        done, self._open = self._open, []
        self._finished = True
        return self._regions(done)

    # ---------------------------------------------------------------------------- internals

    def _merge(self, pieces: list[shapely.Polygon], first_row: np.ndarray,
               top: int) -> tuple[list[shapely.Polygon], list[shapely.Polygon]]:
        """Join the open regions with the new strip's pieces they share a seam segment with.

        Returns (the new strip's regions, merged where they met open ones; the open regions
        that met nothing, now finished)."""
        both = self._last_row & first_row
        if not both.any():
            return list(pieces), list(self._open)
        # Runs of columns where the seam is crossed; a run lies in one region on each side.
        edges = np.diff(np.concatenate(([0], both.view(np.uint8), [0])).astype(np.int8))
        run_starts = np.flatnonzero(edges == 1)
        n_open = len(self._open)
        xs = run_starts + 0.5
        above = shapely.points(xs, np.full(len(xs), top - 0.5))
        below = shapely.points(xs, np.full(len(xs), top + 0.5))
        open_tree = shapely.STRtree(self._open)
        piece_tree = shapely.STRtree(pieces)
        a_run, a_poly = open_tree.query(above, predicate="within")
        b_run, b_poly = piece_tree.query(below, predicate="within")
        open_of_run = np.full(len(xs), -1)
        piece_of_run = np.full(len(xs), -1)
        open_of_run[a_run] = a_poly
        piece_of_run[b_run] = b_poly
        if (open_of_run < 0).any() or (piece_of_run < 0).any():
            raise AssertionError("a seam crossing fell outside the strip polygons")
        uf = _UnionFind(n_open + len(pieces))
        for o, p in zip(open_of_run.tolist(), piece_of_run.tolist(), strict=True):
            uf.union(o, n_open + p)
        groups: dict[int, list[int]] = {}
        for i in range(n_open + len(pieces)):
            groups.setdefault(uf.find(i), []).append(i)
        everything = self._open + list(pieces)
        new_regions: list[shapely.Polygon] = []
        closed: list[shapely.Polygon] = []
        for members in groups.values():
            if len(members) == 1:
                i = members[0]
                (closed if i < n_open else new_regions).append(everything[i])
                continue
            merged = shapely.union_all([everything[i] for i in members])
            if not isinstance(merged, shapely.Polygon):
                raise AssertionError(f"merging across a seam gave a {merged.geom_type}")
            new_regions.append(_corners_only(merged))
        return new_regions, closed

    def _regions(self, pixel_polys: list[shapely.Polygon]) -> list[Region]:
        if not pixel_polys:
            return []
        if self.min_area > 0:
            pixel_polys = [p for p in pixel_polys
                           if p.area * self._pixel_area >= self.min_area]
            if not pixel_polys:
                return []
        t = self.transform
        flip = t.determinant > 0
        mapped = [_map_polygon(p, t, flip) for p in pixel_polys]
        if self.simplify > 0:
            simplified = shapely.simplify(np.asarray(mapped, dtype=object), self.simplify,
                                          preserve_topology=True)
            keep = [i for i, g in enumerate(simplified) if not g.is_empty]
            oriented = _orient_ccw([simplified[i] for i in keep])
            return [Region(polygon=g, pixel=pixel_polys[i])
                    for g, i in zip(oriented, keep, strict=True)]
        return [Region(polygon=g, pixel=p) for g, p in zip(mapped, pixel_polys, strict=True)]


def _map_polygon(poly: shapely.Polygon, t: Affine, flip: bool) -> shapely.Polygon:
    """A pixel-space polygon in map coordinates, laid out as ``mask_to_polygons`` lays out the
    whole mask's: GDAL's ring order (pixel-space shoelace area < 0 for exteriors, > 0 for
    holes), each ring starting at its top-left vertex (least row, then least column), and the
    whole ring reversed when the transform keeps orientation (``det > 0``), so that exteriors
    are counter-clockwise in map coordinates. Equal start vertices make ``simplify`` give
    equal results too."""
    rings = []
    for k, ring in enumerate((poly.exterior, *poly.interiors)):
        c = np.asarray(ring.coords)[:-1, :2]
        x, y = c[:, 0], c[:, 1]
        area2 = float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
        if (k == 0) == (area2 > 0):
            c = c[::-1]
        c = np.roll(c, -int(np.lexsort((c[:, 0], c[:, 1]))[0]), axis=0)
        if flip:
            c = c[::-1]
        rings.append(apply_affine(t, c))
    return shapely.Polygon(rings[0], rings[1:])
