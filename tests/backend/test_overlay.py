"""The PNG overlay: a GeoPackage polygon in another CRS tints exactly the raster pixels inside
it and leaves the others as they were, a marked point lands on its pixel, the PNG replaces
an old one only when complete, and bad inputs fail with a readable error."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from PIL import Image
from pyproj import CRS

from unigeoseg_backend.errors import CRSError, InvalidInputError
from unigeoseg_backend.geo.overlay import (
    OverlayLayer,
    OverlayPoint,
    render_overlay,
    render_raster_overlay,
)
from unigeoseg_backend.geo.vector_io import write_vector
from unigeoseg_backend.geo.vectorize import reproject_geometries

UTM = CRS.from_epsg(32633)
WGS84 = CRS.from_epsg(4326)
TRANSFORM = Affine(10.0, 0, 500_000.0, 0, -10.0, 5_000_000.0)
WIDTH, HEIGHT = 40, 30
#: The polygon: pixel columns 10..25 and rows 8..20 (edges on pixel edges).
COLS, ROWS = (10, 26), (8, 21)
BLUE = (0, 0, 255)


@pytest.fixture
def geotiff(tmp_path):
    """A 40 x 30 uint8 RGB GeoTIFF in UTM 33N, 10 m pixels, a random texture."""
    path = tmp_path / "scene.tif"
    rgb = np.random.default_rng(0).integers(40, 200, (3, HEIGHT, WIDTH), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=3,
                       dtype="uint8", crs="EPSG:32633", transform=TRANSFORM) as dst:
        dst.write(rgb)
    return path, np.moveaxis(rgb, 0, -1)


@pytest.fixture
def polygon_gpkg(tmp_path):
    """The pixel rectangle as a polygon in EPSG:4326, in a GeoPackage."""
    (x0, y0), (x1, y1) = TRANSFORM * (COLS[0], ROWS[1]), TRANSFORM * (COLS[1], ROWS[0])
    rectangle = shapely.box(x0, y0, x1, y1)
    # Densify in UTM first so the lon/lat polygon traces the same ground rectangle.
    in_wgs84 = reproject_geometries([shapely.segmentize(rectangle, 1.0)], UTM, WGS84)
    path = tmp_path / "polygon.gpkg"
    write_vector(path, in_wgs84, [{"name": "rectangle"}], WGS84)
    return path


def _inner_and_outer():
    """Masks of the pixels at least one pixel inside the rectangle, and at least one outside
    it (the outline may take the pixels along the edge itself)."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    inner = (cols >= COLS[0] + 1) & (cols < COLS[1] - 1) & (rows >= ROWS[0] + 1) & \
        (rows < ROWS[1] - 1)
    outer = (cols < COLS[0] - 1) | (cols >= COLS[1] + 1) | (rows < ROWS[0] - 1) | \
        (rows >= ROWS[1] + 1)
    return inner, outer


def test_a_polygon_in_another_crs_tints_the_pixels_inside_and_leaves_the_rest(
        geotiff, polygon_gpkg, tmp_path):
    raster, rgb = geotiff
    out = render_raster_overlay(raster, [OverlayLayer.from_file(polygon_gpkg, BLUE)],
                                tmp_path / "overlay.png", fill_alpha=0.5)
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == rgb.shape
    inner, outer = _inner_and_outer()
    tinted = np.rint(0.5 * rgb.astype(np.float32) + 0.5 * np.asarray(BLUE, np.float32))
    np.testing.assert_array_equal(picture[inner], tinted[inner].astype(np.uint8))
    np.testing.assert_array_equal(picture[outer], rgb[outer])
    # The outline runs along the edge: the first column inside is the layer's colour.
    assert (picture[ROWS[0] + 2:ROWS[1] - 2, COLS[0]] == BLUE).all()


def test_the_scaled_picture_is_the_same_picture_at_more_pixels(geotiff, polygon_gpkg):
    _, rgb = geotiff
    layer = OverlayLayer.from_file(polygon_gpkg, BLUE)
    picture = render_overlay(rgb, TRANSFORM, UTM, [layer], fill_alpha=0.5, scale=3)
    assert picture.shape == (3 * HEIGHT, 3 * WIDTH, 3)
    inner, outer = _inner_and_outer()
    one_to_one = render_overlay(rgb, TRANSFORM, UTM, [layer], fill_alpha=0.5)
    sampled = picture[1::3, 1::3]  # the centre output pixel of each input pixel
    np.testing.assert_array_equal(sampled[inner], one_to_one[inner])
    np.testing.assert_array_equal(sampled[outer], rgb[outer])


def test_a_point_in_lon_lat_is_marked_on_its_pixel(geotiff):
    _, rgb = geotiff
    x, y = TRANSFORM * (30.5, 5.5)  # the centre of pixel (col 30, row 5)
    lon, lat = reproject_geometries([shapely.Point(x, y)], UTM, WGS84)[0].coords[0]
    picture = render_overlay(rgb, TRANSFORM, UTM, [],
                             [OverlayPoint(lon, lat, WGS84, colour=(255, 0, 0))])
    assert tuple(picture[5, 30]) == (255, 0, 0)
    assert (picture[20:, :20] == rgb[20:, :20]).all()  # far from the point: unchanged


def test_a_failed_render_leaves_the_previous_png_alone(geotiff, tmp_path):
    raster, _ = geotiff
    out = tmp_path / "overlay.png"
    out.write_bytes(b"previous")
    with pytest.raises(InvalidInputError, match="scale"):
        render_raster_overlay(raster, [], out, scale=0)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png", "scene.tif"]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_bad_inputs_fail_with_readable_errors(geotiff, tmp_path):
    raster, rgb = geotiff
    with pytest.raises(InvalidInputError, match="cannot read the vector file"):
        OverlayLayer.from_file(tmp_path / "missing.gpkg", BLUE)
    with pytest.raises(InvalidInputError, match="cannot read the raster"):
        render_raster_overlay(tmp_path / "missing.tif", [], tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match="H x W x 3 uint8"):
        render_overlay(rgb[..., 0], TRANSFORM, UTM, [])
    unplaceable = tmp_path / "no_crs.tif"
    with rasterio.open(unplaceable, "w", driver="GTiff", width=4, height=4, count=3,
                       dtype="uint8") as dst:
        dst.write(np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(CRSError, match="no CRS"):
        render_raster_overlay(unplaceable, [], tmp_path / "x.png")


def test_the_png_gets_the_permissions_of_any_new_file(tmp_path):
    import os

    from unigeoseg_backend.geo.overlay import write_png

    umask = os.umask(0o022)
    try:
        path = write_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "o.png")
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644
