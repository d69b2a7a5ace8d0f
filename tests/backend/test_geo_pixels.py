"""Pixel normalisation: any band count and dtype to 8-bit RGB plus a validity mask."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from unigeoseg_backend.errors import BadFrameError, InvalidInputError, NoValidPixelsError
from unigeoseg_backend.geo.pixels import percentile_ranges, to_rgb8
from unigeoseg_protocol.params import RasterOptions

AUTO = RasterOptions()


def ramp(h: int = 20, w: int = 30, c: int = 3, dtype=np.uint16, scale: float = 1.0) -> np.ndarray:
    """Distinct values per band: band k holds k*1000 + index*scale."""
    idx = np.arange(h * w, dtype=np.float64).reshape(h, w)
    return np.stack([(k * 1000 + idx * scale) for k in range(c)], axis=-1).astype(dtype)


@pytest.fixture(autouse=True)
def _no_warnings():
    # NaN casts and overflow must not even warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_uint8_rgb_is_copied_unchanged() -> None:
    px = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    rgb, valid = to_rgb8(px, AUTO)
    np.testing.assert_array_equal(rgb, px)
    assert valid.all() and valid.shape == (16, 24) and valid.dtype == bool
    assert rgb.flags.c_contiguous and not np.shares_memory(rgb, px)
    rgb2, _ = to_rgb8(px, RasterOptions(stretch="none"))
    np.testing.assert_array_equal(rgb2, px)


def test_uint8_nodata_zeroes_invalid_pixels() -> None:
    px = np.full((4, 5, 3), 100, dtype=np.uint8)
    px[1, 2, 1] = 7
    rgb, valid = to_rgb8(px, RasterOptions(nodata=7))
    assert not valid[1, 2] and valid.sum() == 19
    assert (rgb[1, 2] == 0).all() and (rgb[0, 0] == 100).all()
    # A nodata no uint8 can hold, or a fractional one, matches nothing (and does not fail).
    for nodata in (-9999.0, 0.5, 1e10):
        _, valid = to_rgb8(px, RasterOptions(nodata=nodata))
        assert valid.all()


def test_16bit_percentile_stretch() -> None:
    px = ramp(50, 40, 3, np.uint16)
    rgb, valid = to_rgb8(px, AUTO)
    assert valid.all() and rgb.dtype == np.uint8
    for k in range(3):
        band = px[..., k].astype(np.float64)
        lo, hi = np.percentile(band, [2, 98])
        expected = np.rint(np.clip((band - lo) * 255.0 / (hi - lo), 0, 255))
        assert np.abs(rgb[..., k].astype(int) - expected).max() <= 1
        assert rgb[..., k].min() == 0 and rgb[..., k].max() == 255


def test_large_16bit_uses_subsample_and_is_fast() -> None:
    px = np.random.default_rng(1).integers(0, 4096, (1100, 1100, 3), dtype=np.uint16)
    t0 = time.perf_counter()
    rgb, valid = to_rgb8(px, AUTO)
    elapsed = time.perf_counter() - t0
    assert valid.all()
    # Uniform data: the 2nd..98th percentiles are ~82..4014; mid-grey sits near 127.
    assert abs(int(np.median(rgb[..., 0])) - 127) <= 3
    assert elapsed < 2.0


def test_uint8_1024_is_fast() -> None:
    px = np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    to_rgb8(px, AUTO)
    t0 = time.perf_counter()
    for _ in range(5):
        to_rgb8(px, AUTO)
    assert (time.perf_counter() - t0) / 5 < 0.05


def test_float_with_nan_and_inf() -> None:
    px = ramp(10, 10, 3, np.float32, scale=0.01)
    px[2, 3, 0] = np.nan
    px[4, 4, 2] = np.inf
    rgb, valid = to_rgb8(px, AUTO)
    assert not valid[2, 3] and not valid[4, 4] and valid.sum() == 98
    assert (rgb[2, 3] == 0).all() and (rgb[4, 4] == 0).all()
    assert rgb[valid].max() == 255


def test_float32_nodata_matches_in_band_precision() -> None:
    px = ramp(6, 6, 1, np.float32)
    px[0, 0, 0] = np.float32(-3.4028234663852886e38)
    _, valid = to_rgb8(px, RasterOptions(nodata=-3.4028234663852886e38))
    assert not valid[0, 0] and valid.sum() == 35


def test_nan_nodata_option_is_accepted() -> None:
    px = ramp(4, 4, 1, np.int16)
    _, valid = to_rgb8(px, RasterOptions(nodata=float("nan")))
    assert valid.all()


@pytest.mark.parametrize("c", [1, 2])
def test_one_and_two_bands_give_grey_of_band_0(c: int) -> None:
    px = ramp(8, 8, c, np.uint8)
    rgb, _ = to_rgb8(px, AUTO)
    for k in range(3):
        np.testing.assert_array_equal(rgb[..., k], px[..., 0])
    rgb2d, _ = to_rgb8(px[..., 0], AUTO)  # H x W
    np.testing.assert_array_equal(rgb2d, rgb)


def test_rgba_alpha_marks_invalid() -> None:
    px = np.full((5, 6, 4), 200, dtype=np.uint8)
    px[..., 3] = 255
    px[0, :, 3] = 0
    rgb, valid = to_rgb8(px, AUTO)
    assert not valid[0].any() and valid[1:].all()
    assert (rgb[0] == 0).all() and (rgb[1:] == 200).all()
    # Explicit bands: band 3 is data like any other, not alpha.
    _, valid = to_rgb8(px, RasterOptions(bands=(0, 1, 2)))
    assert valid.all()
    # Four 16-bit bands are not RGBA.
    _, valid = to_rgb8(px.astype(np.uint16), AUTO)
    assert valid.all()


def test_five_bands_and_band_choice() -> None:
    px = np.stack([np.full((6, 7), 10 * (k + 1), np.uint8) for k in range(5)], axis=-1)
    rgb, _ = to_rgb8(px, AUTO)
    assert tuple(rgb[0, 0]) == (10, 20, 30)
    rgb, _ = to_rgb8(px, RasterOptions(bands=(4, 2, 0)))
    assert tuple(rgb[0, 0]) == (50, 30, 10)
    rgb, _ = to_rgb8(px, RasterOptions(bands=(3,)))
    assert tuple(rgb[0, 0]) == (40, 40, 40)
    rgb, _ = to_rgb8(px, RasterOptions(bands=(2, 3, 4)))
    assert tuple(rgb[0, 0]) == (30, 40, 50)
    with pytest.raises(InvalidInputError):
        to_rgb8(px, RasterOptions(bands=(5,)))
    with pytest.raises(InvalidInputError):
        to_rgb8(px, RasterOptions(bands=(0, 1)))


def test_nodata_only_in_used_bands() -> None:
    px = np.full((3, 3, 5), 50, dtype=np.uint16)
    px[0, 0, 4] = 0  # band 4 is not used by default
    px[1, 1, 1] = 0
    _, valid = to_rgb8(px, RasterOptions(nodata=0))
    assert valid[0, 0] and not valid[1, 1]


def test_all_invalid_raises() -> None:
    with pytest.raises(NoValidPixelsError):
        to_rgb8(np.zeros((4, 4, 3), np.uint16), RasterOptions(nodata=0))
    with pytest.raises(NoValidPixelsError):
        to_rgb8(np.full((4, 4), np.nan, np.float64), AUTO)
    rgba = np.full((4, 4, 4), 9, np.uint8)
    rgba[..., 3] = 0
    with pytest.raises(NoValidPixelsError):
        to_rgb8(rgba, AUTO)


@pytest.mark.parametrize("px", [
    np.zeros(10, np.uint8), np.zeros((2, 3, 4, 5), np.uint8), np.zeros((0, 5, 3), np.uint8),
    np.zeros((5, 5, 0), np.uint8), np.zeros((4, 4), np.int64), np.zeros((4, 4), np.float16),
    np.zeros((4, 4), np.complex64), np.zeros((4, 4), object), [[1, 2], [3, 4]],
])
def test_bad_frames(px) -> None:
    with pytest.raises(BadFrameError):
        to_rgb8(px, AUTO)


def test_minmax_none_and_constant_bands() -> None:
    px = np.zeros((4, 4, 3), np.int16)
    px[..., 0] = np.arange(16).reshape(4, 4) * 10 - 50  # -50..100
    px[..., 1] = 300  # constant
    px[..., 2] = np.arange(16).reshape(4, 4)
    rgb, _ = to_rgb8(px, RasterOptions(stretch="minmax"))
    assert rgb[0, 0, 0] == 0 and rgb[3, 3, 0] == 255
    assert (rgb[..., 1] == 0).all()  # a constant band has no contrast: 0
    assert rgb[0, 0, 2] == 0 and rgb[3, 3, 2] == 255
    rgb, _ = to_rgb8(px, RasterOptions(stretch="none"))
    np.testing.assert_array_equal(rgb[..., 0], np.clip(px[..., 0], 0, 255))
    assert (rgb[..., 1] == 255).all()
    np.testing.assert_array_equal(rgb[..., 2], px[..., 2])
    f = np.array([[-1.2, 0.4], [254.6, 300.0]], np.float32)
    rgb, _ = to_rgb8(f, RasterOptions(stretch="none"))
    np.testing.assert_array_equal(rgb[..., 0], [[0, 0], [255, 255]])
    i8 = np.array([[-100, 5], [127, 0]], np.int8)
    rgb, _ = to_rgb8(i8, RasterOptions(stretch="none"))
    np.testing.assert_array_equal(rgb[..., 0], [[0, 5], [127, 0]])


def test_sparse_band_falls_back_to_minmax() -> None:
    px = np.zeros((100, 100), np.uint16)
    px[10, 10] = 4000  # a lone bright target: the 2nd..98th percentiles are both 0
    rgb, _ = to_rgb8(px, AUTO)
    assert rgb[10, 10, 0] == 255 and rgb[0, 0, 0] == 0


def test_minmax_ignores_invalid_extremes() -> None:
    px = np.array([[0.0, 1.0], [2.0, -9999.0]], np.float64)
    rgb, valid = to_rgb8(px, RasterOptions(nodata=-9999, stretch="minmax"))
    np.testing.assert_array_equal(rgb[..., 0], [[0, 128], [255, 0]])
    assert valid.tolist() == [[True, True], [True, False]]


def test_bool_and_wide_ints() -> None:
    b = np.eye(4, dtype=bool)
    rgb, valid = to_rgb8(b, AUTO)
    np.testing.assert_array_equal(rgb[..., 0], np.eye(4) * 255)
    assert valid.all()
    for dtype in (np.uint32, np.int32, np.int8, np.float64):
        rgb, valid = to_rgb8(ramp(10, 10, 3, dtype=dtype) if dtype != np.int8
                             else np.arange(-50, 50, dtype=np.int8).reshape(10, 10), AUTO)
        assert valid.all() and rgb.min() == 0 and rgb.max() == 255


def test_unknown_stretch() -> None:
    with pytest.raises(InvalidInputError):
        to_rgb8(np.zeros((2, 2), np.uint8), RasterOptions(stretch="gamma"))


def test_a_fixed_value_range_stretches_every_tile_of_a_raster_alike():
    rng = np.random.default_rng(3)
    raster = rng.integers(200, 3000, (64, 128, 3)).astype(np.uint16)
    raster[:, 64:] //= 4                               # the right half is darker ("water")
    whole = percentile_ranges(raster, RasterOptions())
    assert whole is not None and len(whole) == 3
    fixed = RasterOptions(value_range=whole)
    left, _ = to_rgb8(raster[:, :64], fixed)
    right, _ = to_rgb8(raster[:, 64:], fixed)
    together, _ = to_rgb8(raster, fixed)
    assert np.array_equal(np.concatenate([left, right], axis=1), together)
    per_tile, _ = to_rgb8(raster[:, 64:], RasterOptions())
    print("dark half mean, fixed", right.mean(), "per tile", per_tile.mean())
    assert right.mean() < per_tile.mean() - 30      # a per-tile stretch brightens it


def test_the_value_range_applies_to_8_bit_pixels_and_is_none_where_nothing_is_stretched():
    pixels = np.array([[[10, 20, 30], [110, 120, 130]]], dtype=np.uint8)
    rgb, _ = to_rgb8(pixels, RasterOptions(value_range=((10, 110), (20, 120), (30, 130))))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]
    assert percentile_ranges(pixels, RasterOptions()) is None
    assert percentile_ranges(pixels.astype(np.uint16), RasterOptions(stretch="none")) is None
