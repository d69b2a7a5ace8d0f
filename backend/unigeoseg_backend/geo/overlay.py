"""A PNG picture of segmentation results on their imagery: the raster as 8-bit RGB, each
layer's polygons filled semi-transparently and outlined in its colour, prompt points marked.

Everything is drawn in the raster's pixel grid. Polygons in another CRS are densified in
their own CRS (segments of at most half an output pixel) and then reprojected vertex by
vertex, so a straight edge in their CRS lands where it belongs even when it is a curve in
the raster's. Fills and outlines are burned by GDAL (``rasterio.features.rasterize``): a
pixel is filled when its centre is inside a polygon (the rule ``mask_to_polygons`` inverts,
so a segment's polygons fill exactly the pixels of its mask) and outlined when a boundary
touches it. Pillow draws the point markers and the legend, and encodes the PNG, which is
written next to its target and moved over it in one step.

:func:`render_overlay` draws on an RGB array with an explicit transform and CRS;
:func:`render_raster_overlay` reads a raster file (the same bands and stretch the segmenter
sees) and writes the PNG.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.errors
import pyogrio.raw
import rasterio
import rasterio.errors
import rasterio.features
import rasterio.windows
import shapely
from affine import Affine
from PIL import Image, ImageDraw, ImageFont
from pyproj import CRS

from ..errors import CRSError, InvalidInputError
from .crs import parse_crs, same_crs, transformer
from .pixels import to_rgb8
from .raster_io import read_tile
from .vectorize import reproject_geometries

Colour = tuple[int, int, int]

#: Distinct colours for the layers of one picture, readable on imagery: text result, click
#: result, then more.
LAYER_COLOURS: tuple[Colour, ...] = ((30, 144, 255), (255, 165, 0), (50, 205, 50),
                                     (238, 130, 238))
POINT_COLOUR: Colour = (255, 0, 0)
#: The longest polygon edge, in output pixels, before a polygon is reprojected.
_DENSIFY_PIXELS = 0.5
#: A layer is never densified into more vertices than this (a huge polygon on a fine grid).
_MAX_DENSIFIED_VERTICES = 2_000_000


@dataclass(frozen=True)
class OverlayLayer:
    """Polygons drawn in one colour.

    Attributes:
        geometries: polygons or multipolygons (other geometry types are skipped) in ``crs``.
        crs: their CRS, coordinates in x/y (east/north, lon/lat) order.
        colour: RGB 0..255 of the fill and outline.
        label: the legend's words for it ("" for no legend entry).
    """

    geometries: tuple[shapely.Geometry, ...]
    crs: CRS
    colour: Colour
    label: str = ""

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], colour: Colour, label: str = "",
                  layer: str | None = None) -> OverlayLayer:
        """The polygons of a GeoPackage / GeoJSON / any OGR vector file, in the file's CRS.

        Raises:
            InvalidInputError: the file cannot be read.
            CRSError: the file has features but records no CRS.
        """
        try:
            meta, _, wkb, _ = pyogrio.raw.read(str(path), layer=layer, columns=[])
        except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
            raise InvalidInputError(f"cannot read the vector file {path}: {exc}") from exc
        geometries = tuple(g for g in shapely.from_wkb(wkb) if g is not None and not g.is_empty)
        if meta.get("crs") is None:
            if geometries:
                raise CRSError(f"{path} records no CRS, so it cannot be placed on the raster")
            crs = CRS.from_epsg(4326)  # nothing to place: any CRS will do
        else:
            crs = parse_crs(meta["crs"])
        return cls(geometries, crs, colour, label)


@dataclass(frozen=True)
class OverlayPoint:
    """A prompt point to mark: ``(x, y)`` in ``crs`` (x/y order), drawn as a ringed dot."""

    x: float
    y: float
    crs: CRS
    colour: Colour = POINT_COLOUR
    label: str = ""


def _map_units_per_pixel(geometries: Sequence[shapely.Geometry], crs: CRS, grid_crs: CRS,
                         transform: Affine) -> float:
    """The length, in ``crs`` units, of one output pixel near the middle of ``geometries``."""
    x0, y0, x1, y1 = shapely.total_bounds(np.asarray(geometries, dtype=object))
    forward, back = transformer(crs, grid_crs), transformer(grid_crs, crs)
    cx, cy = forward.transform((x0 + x1) / 2, (y0 + y1) / 2)
    step = min(math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e))
    ax, ay = back.transform(cx, cy)
    bx, by = back.transform(cx + step, cy + step)
    return math.hypot(bx - ax, by - ay) / math.sqrt(2)


def polygons_in_grid_crs(layer: OverlayLayer, grid_crs: CRS,
                         transform: Affine) -> list[shapely.Geometry]:
    """The layer's polygons in ``grid_crs``: densified to half an output pixel in their own
    CRS first when the CRSs differ, so reprojected edges follow their true curves.

    Raises:
        CRSError: a vertex has no image in ``grid_crs``.
    """
    polygons = [g for g in layer.geometries
                if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    if not polygons or same_crs(layer.crs, grid_crs):
        return polygons
    step = _DENSIFY_PIXELS * _map_units_per_pixel(polygons, layer.crs, grid_crs, transform)
    perimeter = float(sum(g.boundary.length for g in polygons))
    if math.isfinite(step) and step > 0:
        step = max(step, perimeter / _MAX_DENSIFIED_VERTICES)
        polygons = list(shapely.segmentize(np.asarray(polygons, dtype=object), step))
    return reproject_geometries(polygons, layer.crs, grid_crs)


def _burn(geometries: Sequence[shapely.Geometry], shape: tuple[int, int], transform: Affine,
          all_touched: bool) -> np.ndarray:
    """H x W bool: pixels GDAL burns for ``geometries`` (map coordinates of ``transform``)."""
    shapes = [(g, 1) for g in geometries if not g.is_empty]
    if not shapes:
        return np.zeros(shape, dtype=bool)
    return rasterio.features.rasterize(shapes, out_shape=shape, transform=transform, fill=0,
                                       dtype=np.uint8, all_touched=all_touched).astype(bool)


def render_overlay(rgb: np.ndarray, transform: Affine, crs: CRS,
                   layers: Sequence[OverlayLayer], points: Sequence[OverlayPoint] = (), *,
                   fill_alpha: float = 0.35, scale: int = 1) -> np.ndarray:
    """Draw ``layers`` and ``points`` on an RGB image.

    Args:
        rgb: H x W x 3 uint8, row 0 at the top, on the grid of ``transform``.
        transform: pixel (col, row) -> map (x, y) in ``crs``, GDAL's affine convention.
        crs: the image's CRS.
        layers: drawn in order (a later layer over an earlier one).
        points: marked after the layers.
        fill_alpha: opacity of a polygon fill, 0 (outline only) .. 1.
        scale: output pixels per image pixel (nearest-neighbour), so thin outlines and
            markers stay legible on a small raster.

    Returns:
        (H * scale) x (W * scale) x 3 uint8. A pixel no layer or point touches keeps its
        input value; a pixel whose centre lies inside a polygon, away from its outline, is
        ``(1 - fill_alpha) * input + fill_alpha * colour``.

    Raises:
        InvalidInputError: ``rgb`` is not H x W x 3 uint8, or a bad ``scale`` / ``fill_alpha``.
        CRSError: a layer or point cannot be reprojected to ``crs``.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidInputError(f"the overlay needs H x W x 3 uint8 RGB, got {rgb.shape} "
                                f"{rgb.dtype}")
    if not isinstance(scale, int) or scale < 1:
        raise InvalidInputError(f"the overlay scale must be a whole number >= 1, got {scale!r}")
    if not 0.0 <= fill_alpha <= 1.0:
        raise InvalidInputError(f"fill_alpha must be in 0..1, got {fill_alpha}")
    image = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1) if scale > 1 else rgb.copy()
    shape = image.shape[:2]
    out_transform = transform * Affine.scale(1 / scale)  # output pixel -> map
    for layer in layers:
        polygons = polygons_in_grid_crs(layer, crs, out_transform)
        colour = np.asarray(layer.colour, dtype=np.float32)
        inside = _burn(polygons, shape, out_transform, all_touched=False)
        blended = (1 - fill_alpha) * image[inside].astype(np.float32) + fill_alpha * colour
        image[inside] = np.rint(blended).astype(np.uint8)
        outline = _burn([g.boundary for g in polygons], shape, out_transform, all_touched=True)
        image[outline] = layer.colour
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    to_pixel = ~out_transform
    radius = max(4, 3 * scale)
    for point in points:
        x, y = point.x, point.y
        if not same_crs(point.crs, crs):
            x, y = transformer(point.crs, crs).transform(x, y)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise CRSError(f"the point ({point.x}, {point.y}) has no position in {crs.name}")
        col, row = to_pixel * (x, y)
        box = (col - radius, row - radius, col + radius, row + radius)
        draw.ellipse(box, outline=(255, 255, 255), width=max(2, radius // 2))
        draw.ellipse((col - radius / 2, row - radius / 2, col + radius / 2, row + radius / 2),
                     fill=point.colour)
    _draw_legend(draw, [(layer.colour, layer.label) for layer in layers if layer.label]
                 + [(point.colour, point.label) for point in points if point.label])
    return np.asarray(picture)


def _draw_legend(draw: ImageDraw.ImageDraw, entries: list[tuple[Colour, str]]) -> None:
    """A swatch and its words per entry, on a dark box in the top-left corner."""
    if not entries:
        return
    font = ImageFont.load_default()
    line = 14
    width = 24 + max(int(draw.textlength(text, font=font)) for _, text in entries)
    draw.rectangle((2, 2, 8 + width, 6 + line * len(entries)), fill=(0, 0, 0))
    for index, (colour, text) in enumerate(entries):
        top = 6 + line * index
        draw.rectangle((6, top, 16, top + 9), fill=colour)
        draw.text((22, top - 1), text, fill=(255, 255, 255), font=font)


def write_png(image: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write an H x W x 3 uint8 image as a PNG, atomically (a temporary file next to
    ``path`` moved over it once complete), and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
            tmp.flush()
            os.fsync(tmp.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes it private; a PNG is for sharing
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def render_raster_overlay(raster: str | os.PathLike[str], layers: Sequence[OverlayLayer],
                          output: str | os.PathLike[str], points: Sequence[OverlayPoint] = (),
                          *, bands: Sequence[int] | None = None, fill_alpha: float = 0.35,
                          scale: int = 1, max_side_px: int = 4096) -> Path:
    """Draw ``layers`` and ``points`` on a raster file and write the PNG to ``output``.

    The raster is read whole (decimated by a whole factor to at most ``max_side_px`` on its
    longer side, the transform following) with the bands and stretch the segmenter uses
    (1-based ``bands`` as R,G,B, else by colour interpretation); nodata is black.

    Raises:
        InvalidInputError: the raster cannot be read, or bad drawing options.
        CRSError: the raster has no CRS, or a layer cannot be reprojected to it.
    """
    try:
        dataset = rasterio.open(raster)
    except rasterio.errors.RasterioIOError as exc:
        raise InvalidInputError(f"cannot read the raster {raster}: {exc}") from exc
    with dataset:
        if dataset.crs is None:
            raise CRSError(f"{raster} has no CRS, so polygons cannot be placed on it")
        crs = parse_crs(dataset.crs.to_wkt())
        window = rasterio.windows.Window(0, 0, dataset.width, dataset.height)
        tile = read_tile(dataset, window, list(bands) if bands else None, max_side_px)
    rgb, _ = to_rgb8(tile.pixels, tile.raster)
    transform = Affine.from_gdal(*tile.georeference.geotransform)
    image = render_overlay(rgb, transform, crs, layers, points, fill_alpha=fill_alpha,
                           scale=scale)
    return write_png(image, output)
