"""The Processing algorithms from the command line: ``qgis_process`` with the plugin installed
in a fresh profile, against a real backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from tests.conftest import REPO
from tests.qgis.test_processing import ORIGIN, PIXEL, UTM, scene  # noqa: F401 - fixture

# Debian's /usr/bin/qgis_process wrapper adds --noversioncheck, which QGIS 3.22's tool rejects.
QGIS_PROCESS = shutil.which("qgis_process.bin", path="/usr/bin") or shutil.which("qgis_process")
pytestmark = pytest.mark.skipif(QGIS_PROCESS is None, reason="qgis_process is not installed")


def _points_gpkg(path, points_utm, labels):
    from osgeo import ogr, osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = ds.CreateLayer("prompts", srs, ogr.wkbPoint)
    layer.CreateField(ogr.FieldDefn("label", ogr.OFTInteger))
    for (x, y), label in zip(points_utm, labels, strict=True):
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetField("label", label)
        feature.SetGeometry(ogr.CreateGeometryFromWkt(f"POINT ({x} {y})"))
        layer.CreateFeature(feature)
    ds = None


@pytest.fixture
def qgis_process_env(tmp_path):
    """A fresh HOME whose default QGIS profile has the plugin (linked) enabled."""
    plugins = tmp_path / "plugins"
    subprocess.run(["bash", str(REPO / "scripts" / "link_plugin.sh"), str(plugins)], check=True,
                   capture_output=True, timeout=60)
    home = tmp_path / "home"
    ini = home / ".local/share/QGIS/QGIS3/profiles/default/QGIS/QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[PythonPlugins]\nunigeoseg_qgis=true\n")
    env = dict(os.environ, HOME=str(home), QGIS_PLUGINPATH=str(plugins),
               QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(tmp_path))
    for name in ("QGIS_CUSTOM_CONFIG_PATH", "QGIS_OPTIONS_PATH"):  # the test session's profile
        env.pop(name, None)
    return env


def test_qgis_process_lists_and_runs_segment_by_points(qgis_process_env, scene, backend,  # noqa: F811
                                                        tmp_path):
    listing = subprocess.run([QGIS_PROCESS, "list"], env=qgis_process_env, capture_output=True,
                             text=True, timeout=180)
    assert "unigeoseg:segmentbypoints" in listing.stdout, listing.stderr[-2000:]
    raster_path, _ = scene
    points = tmp_path / "points.gpkg"
    _points_gpkg(points, [(ORIGIN[0] + 80 * PIXEL, ORIGIN[1] - 75 * PIXEL)], [1])
    out = tmp_path / "segments.gpkg"
    result = subprocess.run(
        [QGIS_PROCESS, "run", "unigeoseg:segmentbypoints", "--json", "--",
         f"INPUT={raster_path}", f"POINTS={points}", "LABEL_FIELD=label",
         f"BACKEND={backend.address}", "TILE_SIZE=256", f"OUTPUT={out}"],
        env=qgis_process_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["results"]["OUTPUT"].startswith(str(out))

    from osgeo import ogr

    ds = ogr.Open(str(out))
    layer = ds.GetLayer(0)
    assert layer.GetFeatureCount() >= 1
    assert layer.GetSpatialRef().GetAuthorityCode(None) == UTM.split(":")[1]
    feature = layer.GetNextFeature()
    assert feature.GetField("engine") == "sam" and feature.GetField("model") == "sam_tiny"
