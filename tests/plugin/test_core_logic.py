"""The plugin's pure logic: tile windows and prompt sessions (no QGIS needed: these run in
the plain test suite)."""

from __future__ import annotations

import pytest
from qgis_plugin.core.session import PromptSession
from qgis_plugin.core.tiles import TileWindow, extent_window, tile_windows, window_around
from qgis_plugin.unigeoseg_protocol.params import Georeference


def window_on_grid(crs, x, y, grid_x0, grid_y0, pixel_size, tile_px, bounds_px):
    """The window around (x, y) of a raster grid of ``bounds_px`` (width, height) pixels."""
    return TileWindow(crs, grid_x0, grid_y0, pixel_size, *bounds_px).window_around(x, y, tile_px)


def test_window_geometry_is_consistent():
    window = TileWindow("EPSG:32633", 500000.0, 4100000.0, 0.5, 200, 100)
    assert window.geotransform == (500000.0, 0.5, 0.0, 4100000.0, 0.0, -0.5)
    assert window.extent == (500000.0, 4099950.0, 500100.0, 4100000.0)
    assert window.to_pixel(500010.25, 4099990.0) == (20.5, 20.0)
    assert window.contains(500099.9, 4099950.1)
    assert not window.contains(500100.1, 4099990.0)
    assert not window.contains(500001.0, 4099990.0, margin_px=8)


def test_a_window_builds_its_georeference_once():
    window = TileWindow("EPSG:32633", 500000.0, 4100000.0, 0.5, 200, 100).subwindow(10, 4, 8, 8)
    assert window.georeference == Georeference("EPSG:32633", window.geotransform)
    assert window.georeference is window.georeference


def test_click_window_is_centred_and_on_the_raster_grid():
    window = window_on_grid("EPSG:32633", 500300.3, 4099700.7, 500000.0, 4100000.0, 0.5, 256,
                            bounds_px=(4000, 4000))
    col, row = window.to_pixel(500300.3, 4099700.7)
    assert (window.width, window.height) == (256, 256)
    assert abs(col - 128) <= 1 and abs(row - 128) <= 1
    assert ((window.x0 - 500000.0) / 0.5).is_integer()
    assert ((4100000.0 - window.y0) / 0.5).is_integer()


def test_click_window_is_shifted_inside_the_raster_and_shrunk_when_it_is_small():
    edge = window_on_grid("EPSG:32633", 500001.0, 4099999.0, 500000.0, 4100000.0, 0.5, 256,
                          bounds_px=(1000, 1000))
    assert (edge.x0, edge.y0) == (500000.0, 4100000.0)
    small = window_on_grid("EPSG:32633", 500010.0, 4099990.0, 500000.0, 4100000.0, 0.5, 256,
                           bounds_px=(100, 60))
    assert (small.width, small.height, small.x0, small.y0) == (100, 60, 500000.0, 4100000.0)


def test_rendered_windows_do_not_depend_on_where_in_a_pixel_the_click_fell():
    a = window_around("EPSG:3857", 1000.1, 2000.1, 2.0, 512)
    b = window_around("EPSG:3857", 1001.9, 2001.9, 2.0, 512)
    assert a == b
    assert (a.x0 / 2.0).is_integer() and (a.y0 / 2.0).is_integer()


def test_tiles_cover_the_extent_with_overlap():
    windows = [tile.window for tile in tile_windows(
        extent_window("EPSG:3857", (0.0, 0.0, 2500.0, 1200.0), 1.0), 1024, 64)]
    covered_x = max(w.x0 + w.width for w in windows)
    covered_y = min(w.y0 - w.height for w in windows)
    assert covered_x >= 2500.0 and covered_y <= 0.0
    assert all(w.width <= 1024 and w.height <= 1024 for w in windows)
    first_row = sorted({w.x0 for w in windows})
    assert first_row[1] - first_row[0] == 1024 - 64


def test_session_prompts_undo_and_object_keys():
    session = PromptSession()
    assert session.is_empty
    session.new_window(TileWindow("EPSG:32633", 0.0, 0.0, 1.0, 10, 10))
    session.add_point(1.0, -1.0, 1)
    session.add_point(2.0, -2.0, 0)
    key = session.object_key
    wire = session.prompt().to_wire()
    assert wire["points"] == [[1.0, -1.0], [2.0, -2.0]] and wire["labels"] == [1, 0]
    assert wire["object_key"] == key and wire["task"] == "interactive"
    assert session.undo()
    assert session.labels == [1] and session.object_key != key  # the stale mask is not reused
    session.set_box(5.0, -1.0, 3.0, -4.0)
    assert session.box == (3.0, -4.0, 5.0, -1.0)
    assert session.undo() and session.undo() and session.box is None and not session.points
    assert not session.undo()
    with pytest.raises(ValueError):
        session.add_point(0.0, 0.0, 2)


def test_tile_cores_partition_the_extent_and_meet_exactly():
    tiles = [(tile.window, tile.core.extent) for tile in tile_windows(
        extent_window("EPSG:3857", (10.0, 20.0, 2510.3, 1220.0), 0.3), 1024, 64)]
    total = 0.0
    for window, (xmin, ymin, xmax, ymax) in tiles:
        wx0, wy0, wx1, wy1 = window.extent
        assert wx0 <= xmin < xmax <= wx1 + 1e-9 and wy0 - 1e-9 <= ymin < ymax <= wy1
        total += (xmax - xmin) * (ymax - ymin)
    cores = [core for _, core in tiles]
    xs = sorted({c[0] for c in cores} | {c[2] for c in cores})
    ys = sorted({c[1] for c in cores} | {c[3] for c in cores})
    # Neighbours' cut lines are the same floats: the grid has one x per cut, no near-copies.
    columns, rows = len({w.x0 for w, _ in tiles}), len({w.y0 for w, _ in tiles})
    assert (columns, rows) == (9, 5)
    assert len(xs) == len({round(x, 6) for x in xs}) == columns + 1
    assert len(ys) == len({round(y, 6) for y in ys}) == rows + 1
    assert total == pytest.approx((xs[-1] - xs[0]) * (ys[-1] - ys[0]), rel=1e-12)
