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


def test_a_16_bit_raster_is_stretched_once_for_all_its_tiles(engine, tmp_path, monkeypatch):
    from unigeoseg_backend.pipelines import whole_raster

    path = tmp_path / "uint16.tif"
    values = np.full((160, 200), 900, np.uint16)
    values[:, 100:] = 4000                        # the right half is much brighter
    values[40:120, 50:170] = 12000
    with rasterio.open(path, "w", driver="GTiff", width=200, height=160, count=3,
                       dtype="uint16", crs="EPSG:32633",
                       transform=Affine(10.0, 0, 500_000, 0, -10.0, 5_000_000)) as dst:
        dst.write(np.stack([values] * 3))
    seen = []
    real = whole_raster.to_rgb8

    def spy(pixels, options):
        rgb, valid = real(pixels, options)
        seen.append((options.value_range, pixels, rgb))
        return rgb, valid

    monkeypatch.setattr(whole_raster, "to_rgb8", spy)
    summary = segment_raster(path, Prompt(text="water"), engine, tmp_path / "out.gpkg", OPTIONS)
    ranges = {r for r, _, _ in seen}
    print("tiles", summary.tiles, "ranges", ranges)
    assert len(seen) == summary.tiles > 1 and len(ranges) == 1 and None not in ranges
    # the same source value is the same 8-bit value on every tile
    looks = {}
    for _, pixels, rgb in seen:
        for value in (900, 4000, 12000):
            at = pixels[..., 0] == value
            if at.any():
                looks.setdefault(value, set()).update(np.unique(rgb[..., 0][at]).tolist())
    assert all(len(v) == 1 for v in looks.values()), looks


def test_an_8_bit_raster_keeps_its_values(engine, tmp_path):
    from unigeoseg_backend.pipelines.whole_raster import raster_value_range

    with rasterio.open(_raster(tmp_path / "eight.tif", 10.0)) as dataset:
        assert raster_value_range(dataset, None) is None
