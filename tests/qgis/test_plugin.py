"""The plugin in real QGIS (offscreen): load / unload, clicks on a real canvas through the map
tool, a real backend process (tiny SAM) over ZeroMQ, features in the target layer."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
from tests.conftest import REPO

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsMapMouseEvent  # noqa: E402
from qgis.PyQt.QtCore import QEvent, QPoint, Qt  # noqa: E402
from qgis.PyQt.QtGui import QKeyEvent  # noqa: E402
from qgis.PyQt.QtWidgets import QPushButton  # noqa: E402

ORIGIN = (500000.0, 4100000.0)  # UTM 33N, 0.5 m pixels
PIXEL = 0.5
UTM = "EPSG:32633"


@pytest.fixture(autouse=True)
def empty_project():
    """Layers left in the project when QGIS exits can crash the interpreter at exit."""
    yield
    QgsProject.instance().removeAllMapLayers()


#: Raster grids by CRS: (EPSG code, origin x, origin y, pixel size). The geographic one is
#: about 0.5 m per pixel at 37 N, 15 E, the central meridian of UTM 33N.
GRIDS = {UTM: (32633, ORIGIN[0], ORIGIN[1], PIXEL), "EPSG:4326": (4326, 15.0, 37.0, 5e-6)}


def _grid(layer: QgsRasterLayer) -> tuple[float, float, float]:
    """(x0, y0, pixel size) of a north-up raster layer."""
    extent = layer.extent()
    return extent.xMinimum(), extent.yMaximum(), layer.rasterUnitsPerPixelX()


@pytest.fixture
def raster(tmp_path, request) -> QgsRasterLayer:
    """A 360 x 300 RGB GeoTIFF in UTM 33N, or in the CRS a test passes as its param."""
    from tests.qgis.test_processing import _write_geotiff

    epsg, x0, y0, pixel = GRIDS[getattr(request, "param", UTM)]
    rng = np.random.default_rng(0)
    data = (rng.random((3, 300, 360)) * 60).astype(np.uint8)
    data[:, 80:160, 120:220] = np.array([230, 220, 40], np.uint8)[:, None, None]
    path = tmp_path / "scene.tif"
    _write_geotiff(path, data, epsg=epsg, geotransform=(x0, pixel, 0.0, y0, 0.0, -pixel))
    layer = QgsRasterLayer(str(path), "scene")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    yield layer
    QgsProject.instance().removeMapLayer(layer.id())


@pytest.fixture
def plugin_on(qgis_iface, qtbot):
    """Call with a backend address (and settings to override): the plugin loaded, panel open,
    connected (unless ``wait_connected=False``); unloaded after."""
    import qgis_plugin

    started = []

    def start(address: str, wait_connected: bool = True, **settings):
        instance = qgis_plugin.classFactory(qgis_iface)
        instance.settings.backend_address = address
        for name, value in settings.items():
            setattr(instance.settings, name, value)
        instance.initGui()
        started.append(instance)
        assert instance.show_panel()
        if wait_connected:
            qtbot.waitUntil(lambda: instance.connection.is_connected, timeout=30000)
        return instance

    yield start
    for instance in started:
        instance.unload()


@pytest.fixture
def plugin(plugin_on, backend):
    return plugin_on(backend.address)


def _set_canvas(canvas, raster_layer, crs: str, rotation: float = 0.0) -> None:
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem(crs))
    canvas.setLayers([raster_layer])
    canvas.setRotation(rotation)
    transform = QgsCoordinateTransform(raster_layer.crs(), QgsCoordinateReferenceSystem(crs),
                                       QgsProject.instance())
    canvas.setExtent(transform.transformBoundingBox(raster_layer.extent()))


def _click(plugin, canvas, raster_layer, col: float, row: float, button=Qt.MouseButton.LeftButton,
           modifiers=Qt.KeyboardModifier.NoModifier) -> QgsPointXY:
    """Click the canvas where raster pixel (col, row) is; returns that point in raster CRS."""
    x0, y0, pixel = _grid(raster_layer)
    target = QgsPointXY(x0 + col * pixel, y0 - row * pixel)
    to_canvas = QgsCoordinateTransform(raster_layer.crs(), canvas.mapSettings().destinationCrs(),
                                       QgsProject.instance())
    device = canvas.getCoordinateTransform().transform(to_canvas.transform(target))
    pos = QPoint(int(round(device.x())), int(round(device.y())))
    tool = plugin.map_tool
    tool.canvasPressEvent(QgsMapMouseEvent(canvas, QEvent.Type.MouseButtonPress, pos, button,
                                           button, modifiers))
    tool.canvasReleaseEvent(QgsMapMouseEvent(canvas, QEvent.Type.MouseButtonRelease, pos, button,
                                             Qt.MouseButton.NoButton, modifiers))
    return target


def _key(plugin, key, modifiers=Qt.KeyboardModifier.NoModifier) -> None:
    plugin.map_tool.keyPressEvent(QKeyEvent(QEvent.Type.KeyPress, key, modifiers))


def _prepare(plugin, canvas, raster_layer, tmp_path, canvas_crs: str, target_crs: str,
             rotation: float = 0.0) -> QgsVectorLayer:
    """Canvas in ``canvas_crs``, the raster as source, a new GeoPackage layer as target."""
    _set_canvas(canvas, raster_layer, canvas_crs, rotation)
    plugin.dock.source_combo.setLayer(raster_layer)
    target = _target_layer(tmp_path, target_crs)
    plugin.dock.target_combo.setLayer(target)
    return target


def _target_layer(tmp_path, crs: str) -> QgsVectorLayer:
    from qgis_plugin.core.results import create_geopackage_layer

    layer = create_geopackage_layer(tmp_path / "out.gpkg", "segments",
                                    QgsCoordinateReferenceSystem(crs))
    QgsProject.instance().addMapLayer(layer)
    return layer


def _vertices_in(layer: QgsVectorLayer, crs: str) -> np.ndarray:
    to_crs = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem(crs),
                                    QgsProject.instance())
    points = []
    for feature in layer.getFeatures():
        geometry = feature.geometry()
        geometry.transform(to_crs)
        points.extend((v.x(), v.y()) for v in geometry.vertices())
    return np.array(points)


def test_plugin_loads_and_unloads_cleanly(qgis_iface, backend):
    import qgis_plugin
    from qgis.core import QgsApplication

    canvas = qgis_iface.mapCanvas()
    items_before = len(canvas.scene().items())
    instance = qgis_plugin.classFactory(qgis_iface)
    instance.settings.backend_address = backend.address
    instance.initGui()
    assert QgsApplication.processingRegistry().providerById("unigeoseg") is not None
    assert instance.show_panel()
    assert canvas.mapTool() is instance.map_tool
    instance.unload()
    assert QgsApplication.processingRegistry().providerById("unigeoseg") is None
    assert canvas.mapTool() is None
    assert instance.connection is None and instance.dock is None and instance.map_tool is None
    assert len(canvas.scene().items()) == items_before


@pytest.mark.parametrize("raster, canvas_crs, target_crs, rotation", [
    (UTM, "EPSG:3857", "EPSG:3857", 0.0),      # raster in UTM, project in Web Mercator
    (UTM, "EPSG:3857", "EPSG:4326", 0.0),      # ... and a geographic target layer
    ("EPSG:4326", UTM, UTM, 0.0),              # raster in EPSG:4326, project in UTM
    (UTM, UTM, UTM, 30.0),                     # a rotated map canvas
], indirect=["raster"])
def test_accepted_polygons_land_on_the_raster_grid(plugin, raster, qgis_iface, qtbot, tmp_path,
                                                   backend, canvas_crs, target_crs, rotation):
    from qgis_plugin.unigeoseg_protocol import Prompt
    from qgis_plugin.unigeoseg_protocol.client import Client

    canvas = qgis_iface.mapCanvas()
    target = _prepare(plugin, canvas, raster, tmp_path, canvas_crs, target_crs, rotation)

    clicked = _click(plugin, canvas, raster, 170.5, 120.5)
    qtbot.waitUntil(lambda: plugin.controller.session.result is not None, timeout=30000)
    session = plugin.controller.session
    # The click reached the backend within one canvas pixel of the intended raster pixel
    # (device pixels are integers), measured in raster units.
    raster_crs = raster.crs().authid()
    to_raster = QgsCoordinateTransform(canvas.mapSettings().destinationCrs(), raster.crs(),
                                       QgsProject.instance())
    one = canvas.getCoordinateTransform().toMapCoordinates(100, 100)
    two = canvas.getCoordinateTransform().toMapCoordinates(101, 101)
    canvas_pixel = to_raster.transform(one).distance(to_raster.transform(two))
    x, y = session.points[0]
    assert math.hypot(x - clicked.x(), y - clicked.y()) <= 1.5 * canvas_pixel
    image_id, prompt = session.image_id, session.prompt()
    assert session.window.crs == raster_crs  # a file raster is read on its own grid

    _key(plugin, Qt.Key.Key_Return)
    assert target.featureCount() >= 1
    feature = next(target.getFeatures())
    assert feature["engine"] == "sam" and feature["model"] == "sam_tiny"
    assert feature["task"] == "interactive" and feature["source_layer"] == "scene"

    # Back in the raster CRS every vertex sits on the raster's pixel grid ...
    vertices = _vertices_in(target, raster_crs)
    x0, y0, pixel = _grid(raster)
    cols = (vertices[:, 0] - x0) / pixel
    rows = (y0 - vertices[:, 1]) / pixel
    np.testing.assert_allclose(cols, np.round(cols), atol=1e-4)
    np.testing.assert_allclose(rows, np.round(rows), atol=1e-4)
    # ... and the polygons are the backend's own answer for the same tile and prompt.
    with Client(backend.address) as client:
        direct = client.segment(Prompt(points=prompt.points, labels=prompt.labels),
                                image_id=image_id).features
    direct_vertices = np.array([xy for f in direct["features"]
                                for ring in f["geometry"]["coordinates"] for xy in ring])
    decimals = int(round(-math.log10(pixel))) + 4  # a 10-4 pixel tolerance
    assert {tuple(np.round(v, decimals)) for v in vertices} == \
        {tuple(np.round(v, decimals)) for v in direct_vertices}


@pytest.fixture(scope="module")
def text_backend(tmp_path_factory, tiny_checkpoint, tiny_text_model):
    """A backend with the tiny SAM and the tiny UniGeoSeg text engine."""
    from tests.conftest import start_backend
    from tests.qgis.conftest import _stop, tiny_args

    process = start_backend(tmp_path_factory.mktemp("text-backend"),
                            *tiny_args(tiny_checkpoint), "--model", str(tiny_text_model))
    yield process
    _stop(process)


def test_a_text_prompt_gives_polygons_merged_across_tiles_on_the_render_grid(
        plugin_on, text_backend, raster, qgis_iface, qtbot, tmp_path):
    plugin = plugin_on(text_backend.address)
    # The offscreen canvas renders about 100 x 100 px: small tiles give several seams.
    plugin.settings.tile_size_px = 80
    canvas = qgis_iface.mapCanvas()
    target = _prepare(plugin, canvas, raster, tmp_path, UTM, UTM)
    extent, resolution = canvas.mapSettings().visibleExtent(), canvas.mapUnitsPerPixel()
    dock = plugin.dock
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("referring"))
    dock.text_edit.setText("the yellow roof")
    dock.text_edit.returnPressed.emit()
    run = plugin.controller.interaction.text_run
    assert run is not None and run.pending > 1
    qtbot.waitUntil(lambda: run.pending == 0, timeout=120000)
    pieces = sum(len(collection["features"]) for collection, _ in run.tiles)

    _key(plugin, Qt.Key.Key_Return)
    features = list(target.getFeatures())
    assert 0 < len(features) <= pieces
    assert {(f["engine"], f["task"], f["prompt"]) for f in features} == \
        {("unigeoseg", "referring", "the yellow roof")}
    assert features[0]["model"] == "unigeoseg-tiny-sparseconv"
    geometries = [f.geometry() for f in features]
    # Merged across seams: no two polygons share an edge or overlap ...
    for i, a in enumerate(geometries):
        for b in geometries[i + 1:]:
            if a.boundingBox().intersects(b.boundingBox()):
                common = a.intersection(b)
                assert common.area() == 0 and common.length() == 0
    # ... and every vertex lies on the grid the canvas was rendered on.
    vertices = np.array([(v.x(), v.y()) for g in geometries for v in g.vertices()])
    cols = (vertices[:, 0] - extent.xMinimum()) / resolution
    rows = (extent.yMaximum() - vertices[:, 1]) / resolution
    np.testing.assert_allclose(cols, np.round(cols), atol=1e-6)
    np.testing.assert_allclose(rows, np.round(rows), atol=1e-6)


@pytest.fixture
def curve_backend(tmp_path, tiny_backend_factory):
    """A backend that requires CURVE: (backend, its public key file, an authorised analyst's
    secret key file, a stranger's secret key file)."""
    import zmq.auth

    folders = {name: tmp_path / name for name in ("server", "authorised", "strangers")}
    for folder in folders.values():
        folder.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(folders["server"], "server")
    _, analyst_secret = zmq.auth.create_certificates(folders["authorised"], "analyst")
    _, stranger_secret = zmq.auth.create_certificates(folders["strangers"], "stranger")
    config = tmp_path / "serve.toml"
    config.write_text(f'curve_server_secret_file = "{server_secret}"\n'
                      f'curve_authorized_clients_dir = "{folders["authorised"]}"\n')
    return (tiny_backend_factory("--config", str(config)), server_public, analyst_secret,
            stranger_secret)


def test_the_plugin_authenticates_to_a_curve_backend_with_the_analysts_keys(
        plugin_on, curve_backend, qtbot):
    backend, server_public, analyst_secret, stranger_secret = curve_backend
    plugin = plugin_on(backend.address, curve_server_public_file=str(server_public),
                       curve_client_secret_file=str(analyst_secret))
    assert plugin.connection.hello_info.authenticated is True

    # The analyst switches to a stranger's key in the panel: a new connection, which the
    # backend refuses (it never answers), and the panel is told.
    try:
        plugin.dock.client_key_edit.setText(str(stranger_secret))
        plugin.dock.client_key_edit.editingFinished.emit()
        assert plugin.settings.curve_client_secret_file == str(stranger_secret)
        with qtbot.waitSignal(plugin.connection.disconnected, timeout=30000) as blocker:
            pass
        assert "answer" in blocker.args[0] and not plugin.connection.is_connected
    finally:  # the panel saved the keys in the profile: leave it as other tests expect
        plugin.settings.curve_server_public_file = plugin.settings.curve_client_secret_file = ""
        plugin.settings.save()


def test_unusable_curve_settings_are_named():
    from qgis_plugin.core.curve import CurveKeyError, curve_keys
    from qgis_plugin.core.settings import PluginSettings

    assert curve_keys(PluginSettings()) is None
    with pytest.raises(CurveKeyError, match="needs both"):
        curve_keys(PluginSettings(curve_server_public_file="/a/server.key"))
    with pytest.raises(CurveKeyError, match="cannot read the backend's public key"):
        curve_keys(PluginSettings(curve_server_public_file="/nonexistent/server.key",
                                  curve_client_secret_file="/nonexistent/me.key_secret"))


def test_later_clicks_reuse_the_tile_and_undo_works(plugin, raster, qgis_iface, qtbot, tmp_path,
                                                    backend):
    from qgis_plugin.unigeoseg_protocol.client import Client

    canvas = qgis_iface.mapCanvas()
    target = _prepare(plugin, canvas, raster, tmp_path, "EPSG:3857", "EPSG:3857")
    _click(plugin, canvas, raster, 170.5, 120.5)
    qtbot.waitUntil(lambda: plugin.controller.session.result is not None, timeout=30000)
    with Client(backend.address) as client:
        encodes_after_first_click = client.status().encodes
    first_window = plugin.controller.session.window
    plugin.controller.session.result = None
    _click(plugin, canvas, raster, 60.5, 60.5, Qt.MouseButton.RightButton)
    qtbot.waitUntil(lambda: plugin.controller.session.result is not None, timeout=30000)
    assert plugin.controller.session.window is first_window
    assert plugin.controller.session.labels == [1, 0]
    with Client(backend.address) as client:
        assert client.status().encodes == encodes_after_first_click  # no re-encode

    _key(plugin, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)  # removes the last point
    assert plugin.controller.session.labels == [1]
    qtbot.waitUntil(lambda: plugin.controller.session.result is not None, timeout=30000)
    _key(plugin, Qt.Key.Key_Return)
    accepted = target.featureCount()
    assert accepted >= 1
    _key(plugin, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)  # undoes the accept
    assert target.featureCount() == 0
    _key(plugin, Qt.Key.Key_Escape)
    assert plugin.controller.session.is_empty


def test_a_backend_killed_mid_request_leaves_layers_untouched(plugin_on, qgis_iface, qtbot,
                                                              raster, tmp_path, backend_process):
    instance = plugin_on(backend_process.address)
    canvas = qgis_iface.mapCanvas()
    target = _prepare(instance, canvas, raster, tmp_path, UTM, UTM)
    os.kill(backend_process.process.pid, signal.SIGSTOP)  # hangs mid-request
    _click(instance, canvas, raster, 170.5, 120.5)
    os.kill(backend_process.process.pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: not instance.connection.is_connected, timeout=30000)
    _key(instance, Qt.Key.Key_Return)  # nothing to accept: no half-written feature
    assert target.featureCount() == 0
    messages = qgis_iface.messageBar().get_messages(1) + qgis_iface.messageBar().get_messages(2)
    assert any("backend" in m.lower() for m in messages)


def test_the_canvas_with_results_renders_to_png(plugin, raster, qgis_iface, qtbot, tmp_path):
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize

    canvas = qgis_iface.mapCanvas()
    target = _prepare(plugin, canvas, raster, tmp_path, "EPSG:3857", "EPSG:3857")
    _click(plugin, canvas, raster, 170.5, 120.5)
    qtbot.waitUntil(lambda: plugin.controller.session.result is not None, timeout=30000)
    _key(plugin, Qt.Key.Key_Return)
    target.commitChanges()
    symbol = target.renderer().symbol()
    symbol.setOpacity(0.6)
    settings = QgsMapSettings()
    settings.setLayers([target, raster])
    settings.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    to_canvas = QgsCoordinateTransform(raster.crs(), QgsCoordinateReferenceSystem("EPSG:3857"),
                                       QgsProject.instance())
    settings.setExtent(to_canvas.transformBoundingBox(raster.extent()))
    settings.setOutputSize(QSize(600, 500))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    path = artifacts / "plugin_canvas.png"
    assert job.renderedImage().save(str(path))
    assert path.stat().st_size > 1000


def test_a_slow_encode_shows_in_the_task_bar_and_can_be_cancelled(plugin_on, qgis_iface, qtbot,
                                                                  raster, backend_process):
    from qgis.core import QgsApplication

    instance = plugin_on(backend_process.address)
    try:
        canvas = qgis_iface.mapCanvas()
        _set_canvas(canvas, raster, UTM)
        instance.dock.source_combo.setLayer(raster)
        os.kill(backend_process.process.pid, signal.SIGSTOP)  # the encode never finishes
        _click(instance, canvas, raster, 170.5, 120.5)
        manager = QgsApplication.taskManager()
        qtbot.waitUntil(lambda: any("encoding" in t.description() for t in manager.activeTasks()),
                        timeout=10000)
        task = next(t for t in manager.activeTasks() if "encoding" in t.description())
        task.cancel()  # what the task bar's cancel button does
        qtbot.waitUntil(lambda: any("cancelled" in m for m in
                                    qgis_iface.messageBar().get_messages(0)), timeout=10000)
        assert instance.controller.session.result is None
    finally:
        os.kill(backend_process.process.pid, signal.SIGCONT)


def _xyz_layer(tmp_path, zoom=16, x0=34000, y0=22000):
    """A local XYZ tile layer (2 x 2 tiles of 256 px, file:// URLs): rendered, not read."""
    from qgis.PyQt.QtGui import QColor, QImage

    for dx in range(2):
        for dy in range(2):
            folder = tmp_path / "tiles" / str(zoom) / str(x0 + dx)
            folder.mkdir(parents=True, exist_ok=True)
            image = QImage(256, 256, QImage.Format.Format_RGB32)
            image.fill(QColor(40 + 60 * dx, 80, 40 + 60 * dy))
            for i in range(60, 160):
                for j in range(80, 200):
                    image.setPixelColor(j, i, QColor(230, 220, 40))
            assert image.save(str(folder / f"{y0 + dy}.png"))
    url = f"file://{tmp_path}/tiles/{{z}}/{{x}}/{{y}}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin={zoom}&zmax={zoom}", "tiles", "wms")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    half = 20037508.342789244
    size = 2 * half / 2 ** zoom
    extent = QgsRectangle(-half + x0 * size, half - (y0 + 2) * size,
                          -half + (x0 + 2) * size, half - y0 * size)
    return layer, extent


def test_online_layers_are_rendered_at_canvas_resolution(plugin, qgis_iface, qtbot, tmp_path):
    layer, extent = _xyz_layer(tmp_path)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setLayers([layer])
    canvas.setExtent(extent)
    plugin.dock.source_combo.setLayer(layer)
    target = _target_layer(tmp_path, "EPSG:3857")
    plugin.dock.target_combo.setLayer(target)
    center = extent.center()
    device = canvas.getCoordinateTransform().transform(center)
    pos = QPoint(int(round(device.x())), int(round(device.y())))
    button = Qt.MouseButton.LeftButton
    plugin.map_tool.canvasPressEvent(QgsMapMouseEvent(canvas, QEvent.Type.MouseButtonPress, pos,
                                                      button, button))
    plugin.map_tool.canvasReleaseEvent(QgsMapMouseEvent(
        canvas, QEvent.Type.MouseButtonRelease, pos, button, Qt.MouseButton.NoButton))
    qtbot.waitUntil(lambda: plugin.controller.session.result is not None, timeout=30000)
    window = plugin.controller.session.window
    assert window.crs == "EPSG:3857"
    assert window.pixel_size == pytest.approx(canvas.mapUnitsPerPixel())
    _key(plugin, Qt.Key.Key_Return)
    vertices = _vertices_in(target, "EPSG:3857")
    assert len(vertices) > 0
    cols = (vertices[:, 0] - window.x0) / window.pixel_size
    rows = (window.y0 - vertices[:, 1]) / window.pixel_size
    np.testing.assert_allclose(cols, np.round(cols), atol=1e-6)
    np.testing.assert_allclose(rows, np.round(rows), atol=1e-6)


def test_missing_pyzmq_is_offered_as_a_one_click_install(qgis_iface, monkeypatch):
    import qgis_plugin
    from qgis_plugin import deps

    monkeypatch.setattr(deps, "missing_dependencies", lambda: ["pyzmq"])
    instance = qgis_plugin.classFactory(qgis_iface)
    instance.initGui()
    try:
        assert instance.show_panel() is False
        assert instance.connection is None and instance.dock is None
        item = qgis_iface.messageBar().currentItem()
        assert item is not None and "pyzmq" in item.text()
        assert [b.text() for b in item.findChildren(QPushButton)] == ["Install"]
    finally:
        instance.unload()


def test_ctrl_z_is_taken_from_qgis_only_when_there_is_something_of_ours_to_undo(
        plugin, raster, qgis_iface, qtbot):
    from qgis.PyQt.QtWidgets import QApplication

    canvas = qgis_iface.mapCanvas()
    _set_canvas(canvas, raster, UTM)
    plugin.dock.source_combo.setLayer(raster)

    def claimed(key, modifiers) -> bool:
        event = QKeyEvent(QEvent.Type.ShortcutOverride, key, modifiers)
        event.ignore()
        QApplication.sendEvent(canvas, event)
        return event.isAccepted()

    ctrl = Qt.KeyboardModifier.ControlModifier
    assert not claimed(Qt.Key.Key_Z, ctrl)          # nothing to undo: QGIS's Undo runs
    assert not claimed(Qt.Key.Key_S, Qt.KeyboardModifier.NoModifier)  # snapping stays QGIS's
    assert claimed(Qt.Key.Key_Return, Qt.KeyboardModifier.NoModifier)
    _click(plugin, canvas, raster, 170.5, 120.5)
    assert claimed(Qt.Key.Key_Z, ctrl)              # a point to take back: ours


@pytest.fixture
def user_crs():
    """A CRS the analyst defined in QGIS (``USER:...``, which only this profile knows)."""
    from qgis.core import QgsApplication

    definition = QgsCoordinateReferenceSystem.fromProj(
        "+proj=tmerc +lat_0=37 +lon_0=15.2 +k=0.9996 +x_0=250000 +y_0=0 +ellps=WGS84 "
        "+units=m +no_defs")
    registry = QgsApplication.coordinateReferenceSystemRegistry()
    QgsApplication.createDatabase()  # the profile's qgis.db, where user CRSs are kept
    crs_id = registry.addUserCrs(definition, "UniGeoSeg test CRS")
    assert crs_id > 0
    crs = QgsCoordinateReferenceSystem(f"USER:{crs_id}")
    assert crs.isValid() and crs.authid().startswith("USER:")
    yield crs
    registry.removeUserCrs(crs_id)


def test_a_raster_in_a_user_defined_crs_is_segmented_end_to_end(plugin, user_crs, qgis_iface,
                                                               qtbot, tmp_path):
    """Its CRS travels as WKT (a USER: code means nothing to the backend), for a file raster
    read on its own grid and for the same raster rendered on the canvas grid."""
    from tests.qgis.test_processing import _write_geotiff

    rng = np.random.default_rng(0)
    data = (rng.random((3, 300, 360)) * 60).astype(np.uint8)
    data[:, 80:160, 120:220] = np.array([230, 220, 40], np.uint8)[:, None, None]
    x0, y0 = 250000.0, 100000.0
    path = tmp_path / "user_crs.tif"
    _write_geotiff(path, data, geotransform=(x0, PIXEL, 0.0, y0, 0.0, -PIXEL),
                   wkt=user_crs.toWkt(QgsCoordinateReferenceSystem.WktVariant.WKT1_GDAL))
    raster = QgsRasterLayer(str(path), "user_scene")
    assert raster.isValid()
    raster.setCrs(user_crs)
    QgsProject.instance().addMapLayer(raster)
    canvas = qgis_iface.mapCanvas()
    target = _prepare(plugin, canvas, raster, tmp_path, user_crs.authid(), UTM)
    assert canvas.mapSettings().destinationCrs().authid().startswith("USER:")

    for pixel_size in (0.0, PIXEL):  # the file's own pixels, then the rendered layer
        plugin.settings.pixel_size_map_units = pixel_size
        before = target.featureCount()
        plugin.controller.session.window = None  # a new window for each path
        _click(plugin, canvas, raster, 170.5, 120.5)
        qtbot.waitUntil(lambda: plugin.controller.session.result is not None, timeout=30000)
        window = plugin.controller.session.window
        assert not window.crs.startswith("USER:")
        assert QgsCoordinateReferenceSystem.fromWkt(window.crs) == user_crs
        _key(plugin, Qt.Key.Key_Return)
        assert target.featureCount() > before
        # Every vertex, back in the user CRS, lies on the window's pixel grid.
        vertices = _vertices_in(target, user_crs.authid())
        cols = (vertices[:, 0] - window.x0) / PIXEL
        rows = (window.y0 - vertices[:, 1]) / PIXEL
        np.testing.assert_allclose(cols, np.round(cols), atol=1e-4)
        np.testing.assert_allclose(rows, np.round(rows), atol=1e-4)
