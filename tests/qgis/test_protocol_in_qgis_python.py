"""The two-Python design: QGIS's own Python (Debian numpy and pyzmq) talks to a real backend.

Runs in ``.venv-qgis`` (see scripts/test.sh); the backend runs in its own venv, whose Python
``UNIGEOSEG_BACKEND_PYTHON`` names.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "qgis_plugin"))

qgis_core = pytest.importorskip("qgis.core")


def test_the_protocol_package_imports_nothing_heavy():
    plugin_dir = str(REPO / "qgis_plugin")
    code = (f"import sys; sys.path.insert(0, {plugin_dir!r}); import unigeoseg_protocol.client; "
            "heavy = {'torch', 'rasterio', 'pyproj', 'shapely', 'geopandas'} & set(sys.modules);"
            " print(sorted(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def _write_scene(path):
    """240 x 200 RGB, UTM 33N, 0.5 m pixels, a bright rectangle on a dark background."""
    from tests.qgis.test_processing import _write_geotiff

    rng = np.random.default_rng(0)
    data = (rng.random((3, 200, 240)) * 60).astype(np.uint8)
    data[:, 50:120, 80:170] = np.array([230, 220, 40], np.uint8)[:, None, None]
    _write_geotiff(path, data, geotransform=(500000.0, 0.5, 0.0, 4100000.0, 0.0, -0.5))


def _render(layer, width, height):
    """Render ``layer`` alone over its extent to an H x W x 4 RGBA array."""
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor, QImage

    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(layer.crs())
    settings.setExtent(layer.extent())
    settings.setOutputSize(QSize(width, height))
    settings.setBackgroundColor(QColor(0, 0, 0, 0))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage().convertToFormat(QImage.Format_RGBA8888)
    buffer = image.constBits()
    buffer.setsize(image.sizeInBytes())
    rgba = np.frombuffer(buffer, np.uint8).reshape(height, image.bytesPerLine() // 4, 4)
    return rgba[:, :width].copy(), settings.visibleExtent()


def test_a_qgis_rendered_tile_is_segmented_exactly_by_the_backend(qgis_app, tmp_path, backend):
    from qgis.core import QgsFields, QgsJsonUtils, QgsRasterLayer

    from unigeoseg_protocol import Georeference, Prompt, SegmentOptions
    from unigeoseg_protocol.client import Client

    path = tmp_path / "scene.tif"
    _write_scene(path)
    layer = QgsRasterLayer(str(path), "scene")
    assert layer.isValid()
    rgba, extent = _render(layer, 240, 200)  # native resolution: 0.5 m
    pixel = extent.width() / 240
    georef = Georeference(layer.crs().authid(),
                          (extent.xMinimum(), pixel, 0.0, extent.yMaximum(), 0.0, -pixel))
    with Client(backend.address, timeout_s=60) as client:
        assert client.hello().engine("sam").available
        click = (500000.0 + 0.5 * 125.5, 4100000.0 - 0.5 * 85.5)
        reply = client.segment(Prompt(points=(click,)), SegmentOptions(return_mask=True),
                               pixels=rgba, georeference=georef)
    mask = reply.mask
    assert 0 < mask.sum() < mask.size
    collection = reply.features
    # Parsed by QGIS itself, as the plugin will (QgsJsonUtils exists in every QGIS >= 3.22).
    parsed = QgsJsonUtils.stringToFeatureList(json.dumps(collection), QgsFields())
    geometries = [feature.geometry() for feature in parsed]
    assert len(geometries) == len(collection["features"])
    # Pixel-edge polygons: total area is exactly the mask's pixel count, and every vertex
    # sits on the 0.5 m grid of the raster.
    assert sum(g.area() for g in geometries) == pytest.approx(mask.sum() * 0.25, rel=1e-12)
    for geometry in geometries:
        for vertex in geometry.vertices():
            assert ((vertex.x() - 500000.0) / 0.5) == pytest.approx(
                round((vertex.x() - 500000.0) / 0.5), abs=1e-6)
            assert ((4100000.0 - vertex.y()) / 0.5) == pytest.approx(
                round((4100000.0 - vertex.y()) / 0.5), abs=1e-6)
