"""Whole-raster runs with the default engine: each tile is encoded on its own grid (the
raster's CRS, the window's transform), and what the engine says about its answers reaches the
run summary once per distinct message, however many tiles said it."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from tests.default_model.test_default_engine import HashEncoder, _brightness_engine

from unigeoseg_backend.default_model.text_encoder import DEFAULT_CLASSES, PhraseVocabulary
from unigeoseg_backend.pipelines.whole_raster import RasterRunOptions, segment_raster
from unigeoseg_protocol.params import Prompt

OPTIONS = RasterRunOptions(tile=64, overlap=16, batch_size=3)


@pytest.fixture(scope="module")
def engine():
    vocabulary = PhraseVocabulary(HashEncoder(), [c for c in DEFAULT_CLASSES
                                                  if c.name in ("water", "tree")])
    return _brightness_engine(vocabulary)  # trained at 8-12 m


def _raster(path, pixel_m: float):
    """160 x 200 RGB GeoTIFF in EPSG:32633: a bright block (red 250) on a dark field."""
    red = np.full((160, 200), 10, np.uint8)
    red[40:120, 50:170] = 250
    with rasterio.open(path, "w", driver="GTiff", width=200, height=160, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(pixel_m, 0, 500_000, 0, -pixel_m, 5_000_000)) as dst:
        dst.write(np.stack([red, red, red]))
    return path


def test_tiles_on_their_georeference_are_segmented_without_an_assumption(engine, tmp_path):
    raster = _raster(tmp_path / "ten_m.tif", 10.0)
    summary = segment_raster(raster, Prompt(text="water"), engine, tmp_path / "out.gpkg",
                             OPTIONS)
    assert summary.tiles > 1 and summary.polygons == 1
    assert summary.messages == ()


def test_an_assumption_on_every_tile_is_in_the_summary_once(engine, tmp_path):
    raster = _raster(tmp_path / "tiny_pixels.tif", 0.001)  # below any plausible pixel size
    summary = segment_raster(raster, Prompt(text="water"), engine, tmp_path / "out.gpkg",
                             OPTIONS)
    assert summary.tiles > 1 and len(summary.messages) == 1
    assert "its georeference gives no usable ground pixel size" in summary.messages[0]
    assert str(summary).count(summary.messages[0]) == 1


def test_a_prompt_it_does_not_understand_writes_nothing_and_says_why_once(engine, tmp_path):
    raster = _raster(tmp_path / "ten_m.tif", 10.0)
    summary = segment_raster(raster, Prompt(text="the airplanes"), engine,
                             tmp_path / "out.gpkg", OPTIONS)
    assert summary.polygons == 0 and len(summary.messages) == 1
    assert "did not understand 'the airplanes'" in summary.messages[0]
