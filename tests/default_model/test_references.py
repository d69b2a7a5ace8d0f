"""Each reference rule does exactly what its docstring states, on small hand-made arrays, and
gives the shares the real scenes are known to have."""

from __future__ import annotations

import numpy as np
import pytest

from unigeoseg_backend.default_model.references import (
    SCENE_LABELS,
    closing_3x3,
    component_sizes,
    landsat8_clouds,
    median_3x3,
    rmnp_lakes,
    scene_reference,
    sentinel2_vegetation,
    sentinel2_water,
    tree_crowns,
)
from unigeoseg_backend.default_model.regions import evaluation_window
from unigeoseg_backend.default_model.sources import LANDSAT8, RMNP, SCENES, SENTINEL2


def _flood_fill_sizes(mask: np.ndarray) -> np.ndarray:
    """Component sizes by a plain 4-connected flood fill, to check ``component_sizes``."""
    labels = -np.ones(mask.shape, int)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start] >= 0:
            continue
        labels[start] = count
        stack = [start]
        while stack:
            r, c = stack.pop()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if (0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc]
                        and labels[nr, nc] < 0):
                    labels[nr, nc] = count
                    stack.append((nr, nc))
        count += 1
    sizes = np.bincount(labels[mask], minlength=1)
    return np.where(mask, sizes[np.maximum(labels, 0)], 0)


def test_component_sizes_equal_a_flood_fill():
    mask = np.random.default_rng(0).random((40, 50)) < 0.45
    np.testing.assert_array_equal(component_sizes(mask), _flood_fill_sizes(mask))


def test_water_is_ndwi_above_0_3_then_a_3x3_median():
    green = np.full((6, 6), 100, np.uint16)
    nir = np.full((6, 6), 100, np.uint16)    # NDWI 0
    nir[:, :3] = 40                          # NDWI (100 - 40) / 140 = 0.43: water
    nir[4, 5] = 40                           # one isolated water pixel: the median drops it
    nir[3, 1] = 60                           # NDWI 0.25, inside the water: the median fills it
    water = sentinel2_water(green, nir)
    expected = np.zeros((6, 6), bool)
    expected[:, :3] = True
    np.testing.assert_array_equal(water, expected)
    # exactly 0.3 is not water; a zero sum is not water either
    assert not sentinel2_water(np.full((3, 3), 13), np.full((3, 3), 7)).any()
    assert not sentinel2_water(np.zeros((3, 3)), np.zeros((3, 3))).any()


def test_vegetation_is_ndvi_above_0_4_and_not_water():
    red = np.array([[10, 10, 40]], np.uint16)
    nir = np.array([[90, 90, 60]], np.uint16)   # NDVI 0.8, 0.8, 0.2
    water = np.array([[False, True, False]])
    np.testing.assert_array_equal(sentinel2_vegetation(red, nir, water), [[True, False, False]])


def test_clouds_are_bqa_cloud_confidence_bits_14_15_at_least_2():
    confidence = np.array([0, 1, 2, 3], np.uint16)
    other_bits = np.uint16(0b0011_1111_1111_1111)   # every lower bit set changes nothing
    bqa = (confidence << 14) | other_bits
    np.testing.assert_array_equal(landsat8_clouds(bqa), [False, False, True, True])


def test_median_and_closing_keep_their_stated_edges():
    mask = np.zeros((5, 5), bool)
    mask[0, :] = True                      # a full edge row keeps itself under the median
    assert median_3x3(mask)[0].all() and not median_3x3(mask)[1:].any()
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False                     # a one-pixel hole is closed
    assert closing_3x3(ring).all()
    rng = np.random.default_rng(1)
    noisy = rng.random((30, 30)) < 0.3
    assert (closing_3x3(noisy) >= noisy).all()   # the closing never removes a pixel


def test_lakes_rule_thresholds_columns_and_component_size():
    shape = (30, 420)
    red = np.full(shape, 80, np.uint8)
    green = np.full(shape, 80, np.uint8)
    blue = np.full(shape, 80, np.uint8)          # brightness 240, blue - red 0: land

    def paint(rows, cols, r, g, b):
        red[rows, cols], green[rows, cols], blue[rows, cols] = r, g, b

    paint(slice(2, 6), slice(2, 6), 40, 60, 48)          # 16 px, blue - red 8, sum 148: lake
    paint(slice(10, 13), slice(2, 5), 40, 60, 48)        # 9 px: too small
    paint(slice(2, 6), slice(20, 24), 40, 60, 47)        # blue - red 7: not a lake
    paint(slice(2, 6), slice(30, 34), 70, 70, 80)        # sum 220: not a lake
    paint(slice(2, 6), slice(404, 410), 40, 60, 48)      # east of column 400: haze
    lakes = rmnp_lakes(red, green, blue)
    expected = np.zeros(shape, bool)
    expected[2:6, 2:6] = True
    np.testing.assert_array_equal(lakes, expected)


def test_tree_crowns_are_the_ellipses_inscribed_in_the_boxes():
    crowns = tree_crowns(np.array([[2.0, 1.0, 12.0, 7.0]]), (10, 16))
    rows, cols = np.mgrid[0:10, 0:16] + 0.5
    inside = ((cols - 7) / 5) ** 2 + ((rows - 4) / 3) ** 2 <= 1
    np.testing.assert_array_equal(crowns, inside)
    assert crowns[4, 2:12].all() and not crowns[1, 2] and not crowns[:, 12:].any()
    # a box partly outside the image is clipped, not refused
    assert tree_crowns(np.array([[-5.0, -5.0, 5.0, 5.0]]), (10, 10))[0, 0]


def test_real_scene_shares_in_their_evaluation_regions():
    def share(mask, scene):
        window = evaluation_window(scene.name)
        rows, cols = window.toslices()
        return mask[rows, cols].mean()

    assert share(scene_reference(SENTINEL2, "water"), SENTINEL2) == pytest.approx(0.734, abs=0.005)
    assert share(scene_reference(SENTINEL2, "vegetation"), SENTINEL2) == pytest.approx(
        0.121, abs=0.005)
    assert share(scene_reference(LANDSAT8, "cloud"), LANDSAT8) == pytest.approx(0.138, abs=0.002)


def test_rmnp_lakes_find_lake_granby_and_grand_lake():
    lakes = scene_reference(RMNP, "lake")
    sizes = np.unique(component_sizes(lakes))[::-1]
    assert 1200 < sizes[0] < 1350      # Lake Granby with Shadow Mountain Lake
    assert 300 < sizes[1] < 400         # Grand Lake
    assert not lakes[:, 400:].any()


@pytest.mark.parametrize("scene, label", [(s, label) for s, labels in SCENE_LABELS.items()
                                          for label in labels])
def test_every_scene_reference_covers_its_grid_and_is_neither_empty_nor_full(scene, label):
    mask = scene_reference(SCENES[scene], label)
    assert mask.shape == (SCENES[scene].height, SCENES[scene].width) and mask.dtype == bool
    low, high = SHARES.get((scene, label), (0.005, 0.6))
    print(scene, label, f"{mask.mean():.5f}")
    assert low < mask.mean() < high


#: Shares outside the usual range: the Landsat 8 scene is forest under cumulus, with a few
#: water pixels at most (water is asked there to learn that dark forest is not water).
SHARES = {("landsat8_cloudy", "water"): (0.0, 0.001),
          ("landsat8_cloudy", "vegetation"): (0.6, 0.9)}


def test_the_landsat_vegetation_is_outside_the_clouds_and_the_water():
    scene = SCENES["landsat8_cloudy"]
    vegetation = scene_reference(scene, "vegetation")
    assert not (vegetation & scene_reference(scene, "cloud")).any()
    assert not (vegetation & scene_reference(scene, "water")).any()


def test_an_unknown_scene_label_names_the_ones_it_has():
    with pytest.raises(KeyError, match="water, vegetation"):
        scene_reference(SENTINEL2, "cloud")
