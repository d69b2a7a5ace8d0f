"""Georeferencing must be exact: polygons on pixel edges, in the right CRS, on every grid."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.crs import CRS as RioCRS
from tests.backend.geo_helpers import rasterize_polygons

from unigeoseg_backend.errors import (
    BadFrameError,
    CRSError,
    InvalidInputError,
    OutOfBoundsError,
)
from unigeoseg_backend.geo.crs import crs_to_text, parse_crs, same_crs, transformer
from unigeoseg_backend.geo.grid import TileGrid
from unigeoseg_backend.geo.vectorize import (
    _euler_number_4,
    feature_collection,
    mask_to_polygons,
    reproject_geometries,
)
from unigeoseg_protocol.params import Georeference

W, H = 40, 32

# name -> (CRS, GDAL geotransform). Sizes are realistic for each CRS: 10 m UTM (Sentinel-2
# style origin), ~4.78 m Web Mercator (zoom 15), 1e-4 degree in EPSG:4326.
_ROT = Affine.rotation(30.0)
GRIDS = {
    "utm-north-up": ("EPSG:32633", (399960.0, 10.0, 0.0, 5300040.0, 0.0, -10.0)),
    "utm-south-up": ("EPSG:32633", (399960.0, 10.0, 0.0, 5299720.0, 0.0, 10.0)),
    "utm-rotated": ("EPSG:32633",
                    (Affine.translation(399960.0, 5300040.0) @ _ROT @ Affine.scale(10.0, -10.0))
                    .to_gdal()),
    "merc-north-up": ("EPSG:3857", (1700012.3456, 4.777314267, 0.0, 6000000.5, 0.0,
                                    -4.777314267)),
    "merc-south-up": ("EPSG:3857", (1700012.3456, 4.777314267, 0.0, 5999847.6, 0.0,
                                    4.777314267)),
    "merc-rotated": ("EPSG:3857",
                     (Affine.translation(1700012.3456, 6000000.5) @ Affine.rotation(-17.5)
                      @ Affine.scale(4.777314267, -4.777314267)).to_gdal()),
    "wgs84-north-up": ("EPSG:4326", (15.0, 1e-4, 0.0, 48.0, 0.0, -1e-4)),
    "wgs84-south-up": ("EPSG:4326", (15.0, 1e-4, 0.0, 47.9968, 0.0, 1e-4)),
    "wgs84-rotated": ("EPSG:4326",
                      (Affine.translation(15.0, 48.0) @ Affine.rotation(12.0)
                       @ Affine.scale(1e-4, -1.3e-4)).to_gdal()),
}


def make_grid(name: str, width: int = W, height: int = H) -> TileGrid:
    crs, gt = GRIDS[name]
    return TileGrid.from_georeference(Georeference(crs=crs, geotransform=tuple(gt)), width, height)


# -- known footprints ----------------------------------------------------------------------

def rect_mask() -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """A 3 x 2 pixel rectangle at col 5, row 7; its outline as pixel corners."""
    m = np.zeros((H, W), dtype=bool)
    m[7:9, 5:8] = True
    return m, [[(5, 7), (8, 7), (8, 9), (5, 9)]]


def l_mask() -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """An L: column 3 rows 2..5, plus row 5 columns 3..6."""
    m = np.zeros((H, W), dtype=bool)
    m[2:6, 3] = True
    m[5, 3:7] = True
    return m, [[(3, 2), (4, 2), (4, 5), (7, 5), (7, 6), (3, 6)]]


def ring_mask() -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """A 5 x 5 square at (10, 10) with a 1 x 2 hole at col 12, rows 12..13."""
    m = np.zeros((H, W), dtype=bool)
    m[10:15, 10:15] = True
    m[12:14, 12] = False
    return m, [[(10, 10), (15, 10), (15, 15), (10, 15)], [(12, 12), (13, 12), (13, 14), (12, 14)]]


FOOTPRINTS = {"rect": rect_mask, "L": l_mask, "ring": ring_mask}


def ring_vertices(ring: shapely.LinearRing) -> list[tuple[float, float]]:
    coords = list(ring.coords)
    assert coords[0] == coords[-1]
    return coords[:-1]


def same_cycle(a: list, b: list) -> bool:
    """Whether ring vertex lists are equal up to the starting vertex (same direction)."""
    if len(a) != len(b) or a[0] not in b:
        return False
    k = b.index(a[0])
    return a == b[k:] + b[:k]


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("shape_name", sorted(FOOTPRINTS))
def test_polygon_vertices_are_exact_pixel_corners(grid_name: str, shape_name: str) -> None:
    grid = make_grid(grid_name)
    mask, outline = FOOTPRINTS[shape_name]()
    polys = mask_to_polygons(mask, grid.transform)
    assert len(polys) == 1
    poly = polys[0]
    assert poly.is_valid
    expected = [[grid.transform @ corner for corner in ring] for ring in outline]
    # Exact (bitwise) equality: vertices are transform * (col, row) and nothing else.
    assert set(ring_vertices(poly.exterior)) == set(expected[0])
    assert len(poly.interiors) == len(expected) - 1
    for interior, exp in zip(poly.interiors, expected[1:], strict=True):
        assert set(ring_vertices(interior)) == set(exp)
    # RFC 7946 orientation in map space, whatever the sign of the transform.
    assert poly.exterior.is_ccw
    assert all(not r.is_ccw for r in poly.interiors)
    # The ring follows the outline (same cyclic order, either direction).
    ext = ring_vertices(poly.exterior)
    assert same_cycle(ext, expected[0]) or same_cycle(ext, expected[0][::-1])
    # Area is pixel count times pixel area.
    assert poly.area == pytest.approx(mask.sum() * grid.pixel_area, rel=1e-9)


def test_north_up_utm_literal_coordinates() -> None:
    """Independent of affine: pixel (5, 7) of a 10 m grid at (399960, 5300040)."""
    grid = make_grid("utm-north-up")
    mask, _ = rect_mask()
    (poly,) = mask_to_polygons(mask, grid.transform)
    assert set(ring_vertices(poly.exterior)) == {
        (400010.0, 5299970.0), (400040.0, 5299970.0), (400040.0, 5299950.0),
        (400010.0, 5299950.0)}


def test_south_up_literal_coordinates() -> None:
    grid = make_grid("utm-south-up")
    mask, _ = rect_mask()
    (poly,) = mask_to_polygons(mask, grid.transform)
    # Row 7 of a south-up grid starting at y = 5299720 lies 70..90 m north of it.
    assert set(ring_vertices(poly.exterior)) == {
        (400010.0, 5299790.0), (400040.0, 5299790.0), (400040.0, 5299810.0),
        (400010.0, 5299810.0)}
    assert poly.exterior.is_ccw


@pytest.mark.parametrize("grid_name", ["utm-north-up", "utm-south-up", "utm-rotated"])
@pytest.mark.parametrize("shape_name", sorted(FOOTPRINTS))
def test_reprojection_to_wgs84_matches_pyproj(grid_name: str, shape_name: str) -> None:
    grid = make_grid(grid_name)
    mask, outline = FOOTPRINTS[shape_name]()
    polys = mask_to_polygons(mask, grid.transform)
    (moved,) = reproject_geometries(polys, grid.crs, CRS.from_epsg(4326))
    to_wgs84 = Transformer.from_crs(32633, 4326, always_xy=True)
    rings = [moved.exterior, *moved.interiors]
    assert len(rings) == len(outline)
    for ring, corners in zip(rings, outline, strict=True):
        xy = np.array([grid.transform @ c for c in corners])
        lon, lat = to_wgs84.transform(xy[:, 0], xy[:, 1])
        expected = np.column_stack((lon, lat))
        got = np.array(ring_vertices(ring))
        assert len(got) == len(expected)  # no vertices added or lost
        # Match each expected corner to a vertex.
        for e in expected:
            d = np.abs(got - e).max(axis=1)
            assert d.min() <= 1e-9 * np.abs(e).max()
        assert 13.5 < lon.min() and lon.max() < 14.0 and 47.5 < lat.min() < 48.0
    assert moved.exterior.is_ccw


@pytest.mark.parametrize("shapely_21", [True, False])
def test_reprojection_orients_polygons_and_multipolygons(shapely_21: bool, monkeypatch) -> None:
    if not shapely_21:  # the shapely 2.0 code path
        monkeypatch.delattr(shapely, "orient_polygons", raising=False)
    cw = shapely.Polygon([(400000, 5300000), (400000, 5300100), (400100, 5300100),
                          (400100, 5300000)])
    assert not cw.exterior.is_ccw
    multi = shapely.MultiPolygon([cw, shapely.box(401000, 5300000, 401100, 5300100, ccw=False)])
    moved = reproject_geometries([cw, multi], CRS.from_epsg(32633), CRS.from_epsg(3857))
    assert moved[0].exterior.is_ccw
    assert all(p.exterior.is_ccw for p in moved[1].geoms)


def test_reprojection_is_noop_for_same_crs() -> None:
    grid = make_grid("wgs84-north-up")
    polys = mask_to_polygons(rect_mask()[0], grid.transform)
    out = reproject_geometries(polys, CRS.from_epsg(4326), parse_crs("OGC:CRS84"))
    assert out[0] is polys[0]


def test_reprojection_outside_domain_raises() -> None:
    # An orthographic view of the South Pole cannot show the Arctic.
    poly = shapely.box(170.0, 80.0, 179.0, 85.0)
    south_ortho = CRS.from_proj4("+proj=ortho +lat_0=-90 +lon_0=0")
    with pytest.raises(CRSError):
        reproject_geometries([poly], CRS.from_epsg(4326), south_ortho)


# -- round trip: mask -> polygons -> rasterize -----------------------------------------------

def blobby_mask(seed: int, height: int = 64, width: int = 72) -> np.ndarray:
    """Seeded random blobs with holes, peninsulas and diagonal-only contacts."""
    rng = np.random.default_rng(seed)
    field = rng.random((height, width))
    for _ in range(3):  # box blur: a few neighbour averages
        padded = np.pad(field, 1, mode="edge")
        field = sum(padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
    mask = field > np.quantile(field, 0.55)
    # Speckle: single pixels and pinholes, diagonal contacts included.
    mask ^= rng.random((height, width)) < 0.03
    # A checkerboard patch: 4-connectivity makes every square its own polygon.
    mask[2:6, 2:6] = (np.indices((4, 4)).sum(axis=0) % 2) == 0
    return mask


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rasterize_round_trip_is_exact(grid_name: str, seed: int) -> None:
    mask = blobby_mask(seed)
    grid = make_grid(grid_name, width=mask.shape[1], height=mask.shape[0])
    polys = mask_to_polygons(mask, grid.transform)
    assert all(p.is_valid for p in polys)
    assert any(len(p.interiors) > 0 for p in polys)  # the masks do have holes
    assert all(p.exterior.is_ccw and not any(r.is_ccw for r in p.interiors) for p in polys)
    back = rasterio.features.rasterize([(p, 1) for p in polys], out_shape=mask.shape,
                                       transform=grid.transform, fill=0, dtype=np.uint8)
    np.testing.assert_array_equal(back.astype(bool), mask)
    np.testing.assert_array_equal(rasterize_polygons(polys, grid), mask)
    total = sum(p.area for p in polys)
    assert total == pytest.approx(mask.sum() * grid.pixel_area, rel=1e-9)


def test_geotiff_round_trip(tmp_path) -> None:
    """A real GeoTIFF: georeference read back by rasterio, polygons burn back to its band."""
    mask = blobby_mask(7)
    crs, gt = GRIDS["utm-rotated"]
    path = tmp_path / "mask.tif"
    with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0],
                       count=1, dtype="uint8", crs=RioCRS.from_string(crs),
                       transform=Affine.from_gdal(*gt)) as ds:
        ds.write(mask.astype(np.uint8), 1)
    with rasterio.open(path) as ds:
        band = ds.read(1)
        grid = TileGrid.from_georeference(
            Georeference(crs=ds.crs.to_wkt(), geotransform=tuple(ds.transform.to_gdal())),
            ds.width, ds.height)
    assert same_crs(grid.crs, CRS.from_epsg(32633))
    polys = mask_to_polygons(band, grid.transform)
    np.testing.assert_array_equal(rasterize_polygons(polys, grid), mask)


def test_valid_mask_counts_as_background() -> None:
    grid = make_grid("utm-north-up")
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[4:10, 4:10] = 255
    valid = np.ones((H, W), dtype=bool)
    valid[4:10, 7:10] = False
    (poly,) = mask_to_polygons(mask, grid.transform, valid=valid)
    assert poly.area == pytest.approx(18 * 100.0)
    assert mask[4, 8] == 255  # the caller's mask is not modified


def test_min_area_simplify_and_max_polygons() -> None:
    grid = make_grid("utm-north-up")
    mask = np.zeros((H, W), dtype=bool)
    mask[1, 1] = True  # 100 m2
    mask[10:20, 10:20] = True  # 10000 m2
    assert len(mask_to_polygons(mask, grid.transform)) == 2
    polys = mask_to_polygons(mask, grid.transform, min_area=101.0)
    assert len(polys) == 1 and polys[0].area == pytest.approx(10000.0)
    # A staircase simplifies to fewer vertices, still valid and CCW.
    stair = np.tril(np.ones((20, 20), dtype=bool))
    exact = mask_to_polygons(stair, grid.transform)[0]
    simple = mask_to_polygons(stair, grid.transform, simplify=15.0)[0]
    assert len(simple.exterior.coords) < len(exact.exterior.coords)
    assert simple.is_valid and simple.exterior.is_ccw
    speckle = (np.indices((H, W)).sum(axis=0) % 2) == 0
    with pytest.raises(InvalidInputError):
        mask_to_polygons(speckle, grid.transform, max_polygons=100)


def test_salt_and_pepper_is_rejected_quickly() -> None:
    grid = make_grid("utm-north-up", 512, 512)
    speckle = (np.indices((512, 512)).sum(axis=0) % 2) == 0
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError, match="more than 10000"):
        mask_to_polygons(speckle, grid.transform)
    assert time.perf_counter() - t0 < 0.5
    # With a min_area that removes the speckle, it is no longer an error.
    speckle[100:140, 100:140] = True
    polys = mask_to_polygons(speckle[:200, :200], grid.transform, min_area=150.0)
    assert len(polys) == 1 and polys[0].area >= 1600 * 100.0


def test_euler_number_bounds_the_region_count() -> None:
    rng = np.random.default_rng(11)
    for _ in range(200):
        m = rng.random((7, 9)) < rng.uniform(0.2, 0.8)
        n = len(mask_to_polygons(m, Affine.identity()))
        assert _euler_number_4(m) <= n
    diag = np.array([[1, 0], [0, 1]], dtype=bool)
    assert _euler_number_4(diag) == 2 == len(mask_to_polygons(diag, Affine.identity()))
    assert _euler_number_4(ring_mask()[0]) == 0


def test_empty_mask_and_bad_masks() -> None:
    grid = make_grid("utm-north-up")
    assert mask_to_polygons(np.zeros((H, W), bool), grid.transform) == []
    with pytest.raises(BadFrameError):
        mask_to_polygons(np.zeros((2, H, W), bool), grid.transform)
    with pytest.raises(BadFrameError):
        mask_to_polygons(np.zeros((H, W), np.float32), grid.transform)
    with pytest.raises(BadFrameError):
        mask_to_polygons(np.zeros((H, W), bool), grid.transform, valid=np.ones((H, W + 1), bool))
    with pytest.raises(InvalidInputError):
        mask_to_polygons(np.ones((H, W), bool), Affine(1, 0, 0, 2, 0, 0))


def test_feature_collection() -> None:
    import json

    grid = make_grid("utm-south-up")
    mask, _ = ring_mask()
    polys = mask_to_polygons(mask, grid.transform)
    fc = feature_collection(polys, [{"score": np.float32(0.5), "engine": "sam"}], grid.crs)
    json.dumps(fc, allow_nan=False)
    assert fc["crs"] == {"type": "name", "properties": {"name": "EPSG:32633"}}
    geom = fc["features"][0]["geometry"]
    assert geom["type"] == "Polygon" and isinstance(geom["coordinates"][0][0], list)
    assert len(geom["coordinates"]) == 2
    assert shapely.geometry.shape(geom).equals_exact(polys[0], 0.0)
    assert fc["features"][0]["properties"] == {"score": 0.5, "engine": "sam"}
    shared = feature_collection(polys * 2, {"task": "referring"}, grid.crs)
    assert [f["properties"] for f in shared["features"]] == [{"task": "referring"}] * 2
    with pytest.raises(InvalidInputError):
        feature_collection(polys, [{}, {}], grid.crs)
    custom = CRS.from_proj4("+proj=tmerc +lon_0=15.3 +ellps=GRS80 +units=m")
    assert parse_crs(feature_collection([], None, custom)["crs"]["properties"]["name"]) == custom


# -- grid --------------------------------------------------------------------------------

@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_map_pixel_round_trip(grid_name: str) -> None:
    grid = make_grid(grid_name)
    colrow = np.random.default_rng(3).uniform(0, [W, H], size=(50, 2))
    back = grid.map_to_pixel(grid.pixel_to_map(colrow))
    np.testing.assert_allclose(back, colrow, rtol=0, atol=1e-7)
    # Pixel corners land on integers, centres on +0.5.
    corner = grid.transform @ (5, 7)
    np.testing.assert_allclose(grid.map_to_pixel(np.array(corner)), [[5, 7]], atol=1e-7)
    np.testing.assert_array_equal(grid.pixel_to_map(np.array([[5.0, 7.0]]))[0], corner)


@pytest.mark.parametrize("grid_name", ["utm-north-up", "utm-south-up", "utm-rotated",
                                       "merc-rotated", "wgs84-rotated"])
def test_point_in_other_crs_lands_on_right_pixel(grid_name: str) -> None:
    grid = make_grid(grid_name)
    centre = grid.pixel_to_map(np.array([[5.5, 7.5]]))
    other = CRS.from_epsg(4326) if not same_crs(grid.crs, CRS.from_epsg(4326)) \
        else CRS.from_epsg(32633)
    x, y = Transformer.from_crs(grid.crs, other, always_xy=True).transform(centre[:, 0],
                                                                             centre[:, 1])
    colrow = grid.map_to_pixel(np.column_stack((x, y)), other)
    np.testing.assert_allclose(colrow, [[5.5, 7.5]], atol=1e-6)
    assert tuple(np.floor(colrow[0]).astype(int)) == (5, 7)


def test_check_inside_and_out_of_bounds_message() -> None:
    grid = make_grid("utm-north-up")
    grid.check_inside(np.array([[0.0, 0.0], [W, H], [W / 2, H / 2]]))  # edges are inside
    with pytest.raises(OutOfBoundsError) as info:
        grid.check_inside(np.array([[1.0, 1.0], [W + 0.5, 3.0]]), what="prompt point")
    x, y = grid.transform @ (W + 0.5, 3.0)
    assert f"{x:.10g}" in info.value.message and f"{y:.10g}" in info.value.message
    assert "prompt point" in info.value.message
    assert info.value.details["point"] == [x, y]
    with pytest.raises(OutOfBoundsError):
        grid.check_inside(np.array([[np.nan, 1.0]]))
    with pytest.raises(OutOfBoundsError):
        grid.check_inside(grid.map_to_pixel(np.array([[0.0, 0.0]]), CRS.from_epsg(4326)))


def test_box_to_pixel_rotated_south_up_and_reprojected() -> None:
    up = make_grid("utm-north-up")
    down = make_grid("utm-south-up")
    # The same 20 x 30 m box: rows count downwards on north-up, upwards on south-up.
    assert up.box_to_pixel((400010.0, 5299950.0, 400040.0, 5299970.0)) == (5.0, 7.0, 8.0, 9.0)
    assert down.box_to_pixel((400010.0, 5299790.0, 400040.0, 5299810.0)) == (5.0, 7.0, 8.0, 9.0)
    rot = make_grid("utm-rotated")
    box = rot.bounds()
    cmin, rmin, cmax, rmax = rot.box_to_pixel(box)
    assert cmin < 0 and rmin < 0 and cmax > W and rmax > H  # the box encloses the tile
    # A WGS 84 box on a UTM grid: the densified outline's pixel bounds, checked by brute force.
    wgs = CRS.from_epsg(4326)
    lon0, lat0 = Transformer.from_crs(32633, 4326, always_xy=True).transform(400100, 5299900)
    wbox = (lon0, lat0, lon0 + 0.002, lat0 + 0.001)
    got = np.array(up.box_to_pixel(wbox, wgs))
    t = np.linspace(0, 1, 2001)
    xs, ys = wbox[0] + (wbox[2] - wbox[0]) * t, wbox[1] + (wbox[3] - wbox[1]) * t
    edge = np.concatenate([np.column_stack((xs, np.full_like(xs, v))) for v in wbox[1::2]]
                          + [np.column_stack((np.full_like(ys, v), ys)) for v in wbox[0::2]])
    cr = up.map_to_pixel(edge, wgs)
    brute = np.array([*cr.min(axis=0), *cr.max(axis=0)])
    np.testing.assert_allclose(got, brute, atol=1e-3)
    with pytest.raises(InvalidInputError):
        up.box_to_pixel((1.0, 2.0, 0.0, 3.0))


def test_window_grid_and_bounds() -> None:
    grid = make_grid("utm-rotated")
    sub = grid.window_grid(5, 7, 10, 4)
    assert (sub.width, sub.height) == (10, 4)
    np.testing.assert_allclose(sub.pixel_to_map(np.array([[0.0, 0.0], [10.0, 4.0]])),
                               grid.pixel_to_map(np.array([[5.0, 7.0], [15.0, 11.0]])),
                               rtol=0, atol=1e-6)
    with pytest.raises(OutOfBoundsError):
        grid.window_grid(35, 0, 10, 4)
    with pytest.raises(InvalidInputError):
        grid.window_grid(0, 0, 0, 4)
    up = make_grid("utm-north-up")
    assert up.bounds() == (399960.0, 5300040.0 - 10 * H, 399960.0 + 10 * W, 5300040.0)
    ref = up.to_georeference()
    assert ref.crs == "EPSG:32633" and ref.geotransform == GRIDS["utm-north-up"][1]


def test_grid_rejects_singular_and_bad_sizes() -> None:
    crs = CRS.from_epsg(32633)
    with pytest.raises(InvalidInputError):
        TileGrid(crs, Affine(1, 2, 0, 2, 4, 0), 10, 10)
    with pytest.raises(InvalidInputError):
        TileGrid(crs, Affine.identity(), 0, 10)
    with pytest.raises(CRSError):
        TileGrid.from_georeference(Georeference("EPSG:999999", (0, 1, 0, 0, 0, -1)), 4, 4)


# -- CRS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, epsg", [
    ("EPSG:32633", 32633), ("epsg:4326", 4326), (" EPSG:3857 ", 3857),
    ("urn:ogc:def:crs:EPSG::4326", 4326),
])
def test_parse_crs_codes(text: str, epsg: int) -> None:
    assert parse_crs(text).to_epsg() == epsg


def test_parse_crs_wkt_proj_and_crs84() -> None:
    wkt = CRS.from_epsg(32633).to_wkt()
    assert parse_crs(wkt) == CRS.from_epsg(32633)
    assert parse_crs(CRS.from_epsg(32633).to_wkt("WKT1_GDAL")).to_epsg() == 32633
    assert parse_crs("+proj=utm +zone=33 +datum=WGS84 +units=m").is_projected
    crs84 = parse_crs("OGC:CRS84")
    assert crs_to_text(crs84) == "OGC:CRS84"
    assert same_crs(crs84, CRS.from_epsg(4326))


@pytest.mark.parametrize("text", [
    "", "   ", "hello world", "EPSG:999999", "EPSG:", "FOO:1234", "PROJCS[garbage]",
    "/etc/passwd", "./my.prj", "C:\\data\\x.prj", "http://example.com/crs.wkt",
    "file:///tmp/x.wkt", "+init=epsg:4326", "+proj=utm +zone=33 +nadgrids=/tmp/x.gsb",
    "WGS 84", "{not json", 4326, None,
])
def test_parse_crs_errors(text) -> None:
    with pytest.raises(CRSError) as info:
        parse_crs(text)
    assert info.value.message.count("unknown CRS") <= 1
    assert len(info.value.message) < 500


def test_transformer_is_cached_and_xy() -> None:
    a = transformer(CRS.from_epsg(4326), CRS.from_epsg(32633))
    assert transformer(parse_crs("epsg:4326"), parse_crs("EPSG:32633")) is a
    x, y = a.transform(15.0, 0.0)  # lon, lat in; east, north out
    assert math.isclose(x, 500000.0) and abs(y) < 1e-6
