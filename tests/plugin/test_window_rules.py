"""The plugin's window rules are the backend's: the same window around a point, the same
tiles and cores over an area (the plugin cannot import the backend, so it writes them out)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from qgis_plugin.core.tiles import TileWindow, tile_windows

from unigeoseg_backend.geo.raster_io import prompt_window
from unigeoseg_backend.geo.tiling import tile_grid


@pytest.mark.parametrize("width, height, tile, overlap", [
    (1, 1, 512, 64), (512, 300, 512, 64), (513, 1025, 512, 64), (2500, 1200, 1024, 64),
    (8335, 4001, 1024, 64), (120, 120, 100, 50), (97, 301, 32, 16), (1000, 999, 100, 0)])
def test_tiles_and_cores_are_the_backends(width, height, tile, overlap):
    area = TileWindow("EPSG:32633", 500000.0, 4100000.0, 0.5, width, height)
    ours = [((t.window.col0, t.window.row0, t.window.width, t.window.height),
             (t.core.col0, t.core.row0, t.core.width, t.core.height))
            for t in tile_windows(area, tile, overlap)]
    backend = [((int(t.window.col_off), int(t.window.row_off), int(t.window.width),
                 int(t.window.height)),
                (int(t.core.col_off), int(t.core.row_off), int(t.core.width),
                 int(t.core.height))) for t in tile_grid(width, height, tile, overlap)]
    assert ours == backend


def test_tiles_of_a_part_of_a_raster_stay_on_its_grid():
    raster = TileWindow("EPSG:32633", 500000.0, 4100000.0, 0.5, 300, 300)
    area = raster.subwindow(10, 20, 120, 120)
    tiles = tile_windows(area, 100, 64)
    # The overlap is at most half a tile: 50 px here.
    assert [(t.window.col0, t.window.row0) for t in tiles] == [(10, 20), (30, 20), (10, 40),
                                                               (30, 40)]
    assert [(t.core.col0, t.core.width) for t in tiles[:2]] == [(10, 60), (70, 60)]
    # Neighbouring cores meet on the same float.
    assert tiles[0].core.extent[2] == tiles[1].core.extent[0]
    assert tiles[0].window.geotransform == (500000.0 + 10 * 0.5, 0.5, 0.0,
                                            4100000.0 - 20 * 0.5, 0.0, -0.5)


def test_a_window_around_a_point_is_the_backends_prompt_window():
    rng = np.random.default_rng(0)
    for (width, height), size in itertools.product([(300, 300), (1000, 200), (50, 70)],
                                                   [128, 200, 255, 1024]):
        grid = TileWindow("EPSG:32633", 500000.0, 4100000.0, 0.5, width, height)
        dataset = SimpleNamespace(width=width, height=height)
        for col, row in rng.uniform(0, 1, (25, 2)) * (width, height):
            x, y = 500000.0 + col * 0.5, 4100000.0 - row * 0.5
            ours = grid.window_around(x, y, size)
            c, r = grid.to_pixel(x, y)
            theirs = prompt_window(dataset, np.array([[c, r]]), None, window_px=size)
            # (Sizes from 128 px: the backend's windows keep a 64 px margin around prompts.)
            assert (ours.col0, ours.row0, ours.width, ours.height) == (
                theirs.col_off, theirs.row_off, theirs.width, theirs.height)
