"""No training window touches an evaluation region, in any scene, and the scenes kept whole
for evaluation have no training window at all."""

from __future__ import annotations

import pytest
from rasterio.windows import Window

from unigeoseg_backend.default_model.regions import (
    REGIONS,
    check_training_window,
    evaluation_window,
    train_windows,
    window_contains,
    windows_intersect,
)
from unigeoseg_backend.default_model.sources import (
    LANDSAT8,
    OSBS_029,
    RMNP,
    SCENES,
    SENTINEL2,
    YELL_OTHER,
    YELL_TRAIN,
)


@pytest.mark.parametrize("name", sorted(SCENES))
def test_no_training_window_intersects_the_evaluation_region(name):
    evaluation = evaluation_window(name)
    for train in train_windows(name):
        assert evaluation is None or not windows_intersect(train, evaluation), (name, train)


@pytest.mark.parametrize("name", sorted(SCENES))
def test_every_scene_has_a_region_and_all_windows_lie_in_its_grid(name):
    assert any(region.scene == name for region in REGIONS)
    for region in REGIONS:
        if region.scene == name:
            assert window_contains(SCENES[name].window, region.window), region


@pytest.mark.parametrize("scene", [RMNP, OSBS_029, YELL_OTHER])
def test_evaluation_only_scenes_are_kept_whole(scene):
    assert train_windows(scene.name) == []
    assert evaluation_window(scene.name) == scene.window


def test_the_stated_rows_and_columns():
    assert evaluation_window(SENTINEL2.name) == Window(0, 1400, 1933, 547)
    assert train_windows(SENTINEL2.name) == [Window(0, 0, 1933, 1300)]
    assert evaluation_window(LANDSAT8.name) == Window(220, 0, 190, 603)
    assert train_windows(LANDSAT8.name) == [Window(0, 0, 190, 603), Window(440, 0, 187, 603)]
    assert train_windows(YELL_TRAIN.name) == [Window(0, 0, 2299, 1750)]
    assert evaluation_window(YELL_TRAIN.name) is None   # its trees are evaluated on the others


def test_windows_intersect_is_exact_at_the_edges():
    a = Window(0, 0, 10, 10)
    assert not windows_intersect(a, Window(10, 0, 5, 5))   # touching edges share no pixel
    assert windows_intersect(a, Window(9, 9, 5, 5))         # one shared corner pixel


def test_a_training_chip_outside_the_training_windows_is_refused():
    check_training_window(SENTINEL2.name, Window(0, 1172, 128, 128))
    with pytest.raises(ValueError, match="not inside a training window"):
        check_training_window(SENTINEL2.name, Window(0, 1200, 128, 128))   # into the guard band
    with pytest.raises(ValueError, match="evaluation-only"):
        check_training_window(RMNP.name, Window(0, 0, 64, 64))
    with pytest.raises(KeyError, match="unknown scene"):
        train_windows("no_such_scene")
