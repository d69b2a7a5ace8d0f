"""``--default-model DIR`` (and ``$UNIGEOSEG_DEFAULT_MODEL``) on ``unigeoseg predict`` and
``unigeoseg serve``: the default model answering is the one in the folder named (its card's
``name@version`` in the reply and in hello), and a folder that does not exist is refused in
words."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from tests.backend.default_model_folders import save_tiny_default_model

from unigeoseg_backend.cli.main import main
from unigeoseg_backend.cli.predict import DEFAULT_MODEL_ENV
from unigeoseg_backend.default_model.weights_io import GsdRange
from unigeoseg_protocol.client import Client

MODEL_ID = "cli-test-model@0.0.0"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """Random tiny-configuration weights whose card knows water at 1 m .. 1 km pixels."""
    return save_tiny_default_model(tmp_path_factory.mktemp("default_model"), "cli-test-model",
                                   GsdRange(1.0, 1000.0))


@pytest.fixture
def geotiff(tmp_path):
    """A 64 x 64 uint8 RGB GeoTIFF in UTM 33N at 10 m."""
    path = tmp_path / "scene.tif"
    rgb = np.random.default_rng(1).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                       crs="EPSG:32633",
                       transform=Affine(10.0, 0, 500_000.0, 0, -10.0, 5_000_000.0)) as dst:
        dst.write(rgb)
    return path


@pytest.fixture(autouse=True)
def no_other_engines(monkeypatch, tmp_path):
    """No SAM in an empty weights cache and no UniGeoSeg model: the default model answers."""
    monkeypatch.setenv("UNIGEOSEG_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("UNIGEOSEG_MODEL", raising=False)
    monkeypatch.delenv(DEFAULT_MODEL_ENV, raising=False)


def _predict_text(geotiff, output, *extra):
    return main(["predict", str(geotiff), "--text", "water", "--device", "cpu",
                 "-o", str(output), *extra])


def test_predict_text_is_answered_by_the_default_model_folder_named(geotiff, weights_dir,
                                                                    tmp_path, capsys):
    output = tmp_path / "water.gpkg"
    assert _predict_text(geotiff, output, "--default-model", str(weights_dir)) == 0
    assert f"engine default, model {MODEL_ID}" in capsys.readouterr().out
    assert pyogrio.read_info(str(output))["crs"] == "EPSG:32633"


def test_predict_reads_the_default_model_folder_from_the_environment(
        geotiff, weights_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(weights_dir))
    assert _predict_text(geotiff, tmp_path / "water.gpkg") == 0
    assert f"engine default, model {MODEL_ID}" in capsys.readouterr().out


def test_a_default_model_folder_that_does_not_exist_is_refused(geotiff, tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert _predict_text(geotiff, tmp_path / "x.gpkg", "--default-model", str(missing)) == 1
    err = capsys.readouterr().err
    assert f"the default model folder {missing} (--default-model) does not exist" in err
    assert not (tmp_path / "x.gpkg").exists()


def test_serve_offers_the_default_model_folder_named(weights_dir, backend_factory):
    backend = backend_factory("--default-model", str(weights_dir))
    with Client(backend.address, timeout_s=30) as client:
        default = client.hello().engine("default")
    assert default.available
    assert default.about is not None and default.about["name"] == "cli-test-model"


def test_a_whole_raster_run_is_answered_by_the_default_model_folder_named(geotiff, weights_dir,
                                                                          tmp_path, capsys):
    output = tmp_path / "water-whole.gpkg"
    assert _predict_text(geotiff, output, "--whole-raster", "--no-progress",
                         "--default-model", str(weights_dir)) == 0
    line = capsys.readouterr().out
    print(line)
    assert f"model {MODEL_ID}" in line
    assert pyogrio.read_info(str(output))["crs"] == "EPSG:32633"
