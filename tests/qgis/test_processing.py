"""The UniGeoSeg Processing provider in real QGIS (offscreen): ``processing.run`` against a real
tiny-SAM backend process (``backend`` from tests/qgis/conftest.py), against a scripted loopback
backend (text path, cancellation, errors), and against nothing; plus exact native-resolution
raster windows."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from tests.conftest import REPO

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant  # noqa: E402
from qgis_plugin.core.raster_read import is_file_raster  # noqa: E402
from qgis_plugin.core.raster_window import (  # noqa: E402
    RasterWindowError,
    raster_grid,
    read_window,
    read_window_around,
)
from qgis_plugin.processing_algs import UniGeoSegProvider  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ORIGIN = (500000.0, 4100000.0)  # UTM 33N, 0.5 m pixels
PIXEL = 0.5
SIZE = 300
UTM = "EPSG:32633"
# Two bright objects (rows, cols) on a dark random background.
OBJECT_A = (slice(40, 110), slice(40, 120))
OBJECT_B = (slice(180, 260), slice(170, 270))
RESULT_FIELDS = ("prompt", "task", "engine", "model", "score", "source_layer", "created")


def _map(col: float, row: float) -> tuple[float, float]:
    return ORIGIN[0] + col * PIXEL, ORIGIN[1] - row * PIXEL


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture
def provider(qgis_processing):
    registry = QgsApplication.processingRegistry()
    instance = UniGeoSegProvider()
    assert registry.addProvider(instance)
    yield registry.providerById("unigeoseg")
    registry.removeProvider("unigeoseg")
    assert registry.providerById("unigeoseg") is None


def _write_geotiff(path, data: np.ndarray, nodata=None, epsg=32633,
                   geotransform=(ORIGIN[0], PIXEL, 0.0, ORIGIN[1], 0.0, -PIXEL), wkt=None):
    """A GeoTIFF in EPSG:``epsg``, or in the CRS ``wkt`` defines."""
    from osgeo import gdal, gdal_array, osr

    bands, height, width = data.shape
    ds = gdal.GetDriverByName("GTiff").Create(
        str(path), width, height, bands, gdal_array.NumericTypeCodeToGDALTypeCode(data.dtype))
    ds.SetGeoTransform(geotransform)
    srs = osr.SpatialReference()
    if wkt is None:
        srs.ImportFromEPSG(epsg)
    else:
        srs.ImportFromWkt(wkt)
    ds.SetProjection(srs.ExportToWkt())
    for band in range(bands):
        ds.GetRasterBand(band + 1).WriteArray(data[band])
        if nodata is not None:
            ds.GetRasterBand(band + 1).SetNoDataValue(nodata)
    ds = None


@pytest.fixture
def scene(tmp_path):
    """A 300 x 300 3-band uint8 GeoTIFF in EPSG:32633 (0.5 m pixels) and its layer."""
    rng = np.random.default_rng(0)
    data = (rng.random((3, SIZE, SIZE)) * 60).astype(np.uint8)
    data[(slice(None), *OBJECT_A)] = np.array([230, 220, 40], np.uint8)[:, None, None]
    data[(slice(None), *OBJECT_B)] = np.array([40, 200, 230], np.uint8)[:, None, None]
    path = tmp_path / "scene.tif"
    _write_geotiff(path, data)
    layer = QgsRasterLayer(str(path), "scene")
    assert layer.isValid()
    # Owned by the project, deleted at teardown: a layer that outlives QgsApplication (pytest
    # drops fixture values after the session teardown) crashes the interpreter.
    QgsProject.instance().addMapLayer(layer, False)
    yield path, layer
    QgsProject.instance().removeMapLayer(layer.id())


def _point_layer(points_utm, labels=None, path=None) -> QgsVectorLayer:
    """Points given in UTM, stored in EPSG:4326 (so the algorithm must transform them)."""
    layer = QgsVectorLayer("Point?crs=EPSG:4326", "prompts", "memory")
    provider = layer.dataProvider()
    provider.addAttributes([QgsField("label", QVariant.Type.Int)])
    layer.updateFields()
    to_wgs84 = QgsCoordinateTransform(QgsCoordinateReferenceSystem(UTM),
                                      QgsCoordinateReferenceSystem("EPSG:4326"),
                                      QgsProject.instance())
    features = []
    for index, (x, y) in enumerate(points_utm):
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(to_wgs84.transform(QgsPointXY(x, y))))
        feature.setAttributes([labels[index] if labels is not None else 1])
        features.append(feature)
    assert provider.addFeatures(features)[0]
    layer.updateExtents()
    return layer


class RecordingFeedback(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.infos: list[str] = []
        self.progress_values: list[float] = []
        self.progressChanged.connect(self.progress_values.append)

    def reportError(self, error, fatalError=False):  # noqa: N802, N803 - QGIS API
        self.errors.append(error)
        super().reportError(error, fatalError)

    def pushWarning(self, warning):  # noqa: N802 - QGIS API
        self.warnings.append(warning)
        super().pushWarning(warning)

    def pushInfo(self, info):  # noqa: N802 - QGIS API
        self.infos.append(info)
        super().pushInfo(info)


def _run(algorithm: str, parameters: dict, feedback=None) -> dict:
    import processing

    return processing.run(algorithm, parameters, feedback=feedback or QgsProcessingFeedback())


def _run_failing(algorithm: str, parameters: dict) -> str:
    """Run an algorithm that must fail; return what the analyst reads (the exception text and
    the errors reported to the feedback: QGIS 3.22 reports the algorithm's exception there)."""
    feedback = RecordingFeedback()
    with pytest.raises(QgsProcessingException) as caught:
        _run(algorithm, parameters, feedback)
    return "\n".join([str(caught.value), *feedback.errors])


def _read_output(path) -> list[QgsFeature]:
    layer = QgsVectorLayer(str(path), "out", "ogr")
    assert layer.isValid()
    assert layer.crs().authid() == UTM
    assert [f.name() for f in layer.fields() if f.name() != "fid"] == list(RESULT_FIELDS)
    return list(layer.getFeatures())


def _assert_on_pixel_grid(geometry: QgsGeometry) -> None:
    for vertex in geometry.vertices():
        col = (vertex.x() - ORIGIN[0]) / PIXEL
        row = (ORIGIN[1] - vertex.y()) / PIXEL
        assert col == round(col) and row == round(row), (vertex.x(), vertex.y())
        assert 0 <= col <= SIZE and 0 <= row <= SIZE


# ---------------------------------------------------------------------------- provider

def test_the_provider_lists_its_algorithms(provider):
    assert provider.name() == "UniGeoSeg"
    ids = sorted(alg.id() for alg in provider.algorithms())
    assert ids == ["unigeoseg:finetunemodel", "unigeoseg:segmentbypoints",
                   "unigeoseg:segmentbytext"]
    registry = QgsApplication.processingRegistry()
    points = registry.algorithmById("unigeoseg:segmentbypoints")
    assert points.displayName() == "Segment by points"
    assert points.shortHelpString() and points.group()
    assert {p.name() for p in points.parameterDefinitions()} >= {
        "INPUT", "POINTS", "LABEL_FIELD", "BACKEND", "TILE_SIZE", "SIMPLIFY", "MIN_AREA",
        "OUTPUT"}
    assert points.parameterDefinition("TILE_SIZE").defaultValue() == 1024
    text = registry.algorithmById("unigeoseg:segmentbytext")
    assert {p.name() for p in text.parameterDefinitions()} >= {
        "INPUT", "PROMPT", "TASK", "EXTENT", "BACKEND", "TILE_SIZE", "OUTPUT"}
    assert text.parameterDefinition("TASK").options() == ["referring", "reasoning"]


def test_the_provider_loads_without_pyzmq():
    code = textwrap.dedent(f"""
        import sys
        sys.modules["zmq"] = None  # any "import zmq" now raises ImportError
        sys.path.insert(0, {str(REPO)!r})
        from qgis.core import QgsApplication
        app = QgsApplication([], False)
        app.initQgis()
        from qgis_plugin.processing_algs import UniGeoSegProvider
        registry = QgsApplication.processingRegistry()
        assert registry.addProvider(UniGeoSegProvider())
        print(sorted(a.id() for a in registry.providerById("unigeoseg").algorithms()))
        registry.removeProvider("unigeoseg")
        app.exitQgis()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**__import__("os").environ,
                                              "QT_QPA_PLATFORM": "offscreen"})
    assert result.returncode == 0, result.stderr
    assert ("['unigeoseg:finetunemodel', 'unigeoseg:segmentbypoints', "
            "'unigeoseg:segmentbytext']") in result.stdout


def test_without_pyzmq_an_algorithm_says_how_to_install_it(provider, scene, tmp_path,
                                                           monkeypatch):
    _, raster = scene
    monkeypatch.setitem(sys.modules, "zmq", None)
    message = _run_failing("unigeoseg:segmentbypoints", {
        "INPUT": raster, "POINTS": _point_layer([_map(80, 75)]),
        "BACKEND": "tcp://127.0.0.1:5557", "OUTPUT": str(tmp_path / "out.gpkg")})
    assert re.search(r"pyzmq.*pip install pyzmq", message), message


# ---------------------------------------------------------------------------- raster windows

def test_raster_window_equals_the_geotiff_pixels_and_geotransform(scene):
    from osgeo import gdal

    path, layer = scene
    grid = raster_grid(layer)
    assert grid.geotransform == (ORIGIN[0], PIXEL, 0.0, ORIGIN[1], 0.0, -PIXEL)
    dataset = gdal.Open(str(path))
    provider = layer.dataProvider().clone()
    for col0, row0, width, height in ((0, 0, SIZE, SIZE), (17, 41, 128, 96), (299, 0, 1, 300),
                                      (150, 203, 150, 97)):
        window = read_window(layer, grid, grid.window.subwindow(col0, row0, width, height),
                             provider=provider)
        expected = np.stack([dataset.GetRasterBand(b + 1).ReadAsArray(col0, row0, width, height)
                             for b in range(3)], axis=-1)
        assert window.pixels.dtype == np.uint8 and window.pixels.shape == (height, width, 3)
        assert np.array_equal(window.pixels, expected)
        # Exactly the geotransform GDAL gives the same window (gdal.Translate -srcwin).
        sub = gdal.Translate("/vsimem/window.tif", dataset, srcWin=[col0, row0, width, height])
        assert window.georeference.geotransform == sub.GetGeoTransform()
        assert window.georeference.crs == UTM
        assert window.raster.nodata is None
        sub = None
        gdal.Unlink("/vsimem/window.tif")


def test_a_window_around_a_point_is_shifted_inside_the_raster(scene):
    _, layer = scene
    grid = raster_grid(layer)
    near_corner = read_window_around(layer, *_map(290.5, 3.5), 128, grid=grid)
    assert (near_corner.window.col0, near_corner.window.row0) == (SIZE - 128, 0)
    assert near_corner.pixels.shape == (128, 128, 3)
    # Centred as the backend centres its windows: from floor(position - size / 2).
    centred = read_window_around(layer, *_map(150.25, 150.75), 100, grid=grid).window
    assert (centred.col0, centred.row0) == (100, 100)
    assert centred.contains(*_map(150.25, 150.75))
    whole = read_window_around(layer, *_map(10, 10), 1024, grid=grid).window
    assert (whole.col0, whole.row0, whole.width, whole.height) == (0, 0, SIZE, SIZE)
    extent = QgsRectangle(*_map(10, 140), *_map(130, 20))  # xmin, ymin, xmax, ymax
    area = grid.window.covering(extent.xMinimum(), extent.yMinimum(), extent.xMaximum(),
                                extent.yMaximum())
    assert (area.col0, area.row0, area.width, area.height) == (10, 20, 120, 120)
    assert grid.window.covering(*_map(-20, 10), *_map(-10, 0)) is None


def test_nodata_travels_with_the_window(tmp_path):
    data = np.arange(3 * 40 * 50, dtype=np.int16).reshape(3, 40, 50)
    data[:, 5, 7] = -1
    _write_geotiff(tmp_path / "int.tif", data, nodata=-1)
    layer = QgsRasterLayer(str(tmp_path / "int.tif"), "int")
    grid = raster_grid(layer)
    window = read_window(layer, grid, grid.window.subwindow(0, 0, 50, 40))
    assert window.raster.nodata == -1 and window.pixels.dtype == np.int16
    assert np.array_equal(window.pixels, np.moveaxis(data, 0, -1))

    floats = np.linspace(0, 1, 2 * 30 * 20, dtype=np.float32).reshape(2, 30, 20)
    floats[1, 3, 4] = -9999
    _write_geotiff(tmp_path / "float.tif", floats, nodata=-9999)
    layer = QgsRasterLayer(str(tmp_path / "float.tif"), "float")
    grid = raster_grid(layer)
    window = read_window(layer, grid, grid.window.subwindow(0, 0, 20, 30))
    assert window.pixels.dtype == np.float32 and window.raster.nodata is None
    assert np.isnan(window.pixels[3, 4, 1]) and np.isfinite(window.pixels[3, 4, 0])
    expected = np.moveaxis(floats, 0, -1).copy()
    expected[3, 4, 1] = np.nan
    assert np.array_equal(window.pixels, expected, equal_nan=True)


def test_a_window_reads_the_bands_asked_for_in_their_order(tmp_path):
    from osgeo import gdal

    rng = np.random.default_rng(1)
    data = rng.integers(0, 4000, size=(5, 60, 70), dtype=np.uint16)
    path = tmp_path / "five.tif"
    _write_geotiff(path, data)
    layer = QgsRasterLayer(str(path), "five")
    grid = raster_grid(layer)
    dataset = gdal.Open(str(path))
    for bands in ([4, 2, 5], [3], [1, 1]):
        window = read_window(layer, grid, grid.window.subwindow(9, 7, 40, 30), bands=bands)
        expected = np.stack([dataset.GetRasterBand(b).ReadAsArray(9, 7, 40, 30) for b in bands],
                            axis=-1)
        assert window.pixels.dtype == np.uint16 and window.pixels.shape == (30, 40, len(bands))
        assert np.array_equal(window.pixels, expected)
    around = read_window_around(layer, *_map(35, 30), 32, grid=grid, bands=[5, 1])
    expected = np.stack([dataset.GetRasterBand(b).ReadAsArray(around.window.col0,
                                                              around.window.row0, 32, 32)
                         for b in (5, 1)], axis=-1)
    assert np.array_equal(around.pixels, expected)
    assert read_window(layer, grid, grid.window).pixels.shape == (60, 70, 5)  # None: all
    for bad in ([0], [6], [1, 7], []):
        with pytest.raises(RasterWindowError, match=r"band|bands"):
            read_window_around(layer, *_map(35, 30), 32, grid=grid, bands=bad)
    with pytest.raises(RasterWindowError, match=r"band 6 does not exist.*5 band\(s\)"):
        read_window(layer, grid, grid.window.subwindow(0, 0, 10, 10), bands=[2, 6])


def test_only_north_up_square_pixel_file_rasters_are_read_raw(scene, tmp_path):
    _, layer = scene
    assert is_file_raster(layer)
    data = np.zeros((3, 40, 50), np.uint8)
    rotated = tmp_path / "rotated.tif"
    _write_geotiff(rotated, data, geotransform=(ORIGIN[0], PIXEL, 0.1, ORIGIN[1], 0.1, -PIXEL))
    layer = QgsRasterLayer(str(rotated), "rotated")
    assert layer.isValid() and layer.providerType() == "gdal"
    assert not raster_grid(layer).native  # QGIS warps it onto a grid of its own
    assert not is_file_raster(layer)
    oblong = tmp_path / "oblong.tif"
    _write_geotiff(oblong, data, geotransform=(ORIGIN[0], PIXEL, 0.0, ORIGIN[1], 0.0, -0.25))
    layer = QgsRasterLayer(str(oblong), "oblong")
    assert layer.isValid() and raster_grid(layer).native
    assert not is_file_raster(layer)


# ---------------------------------------------------------------------------- real backend

def test_segment_by_points_with_a_backend(provider, scene, backend, tmp_path):
    _, raster = scene
    centre_a, centre_b = _map(80.5, 75.5), _map(220.5, 220.5)
    background = _map(60.5, 100.5)  # in A's 128-px window, not in B's
    outside = (ORIGIN[0] - 50.0, ORIGIN[1] + 50.0)
    points = _point_layer([centre_a, centre_b, background, outside], labels=[1, 1, 0, 1])
    output = tmp_path / "points.gpkg"
    feedback = RecordingFeedback()
    result = _run("unigeoseg:segmentbypoints", {
        "INPUT": raster, "POINTS": points, "LABEL_FIELD": "label",
        "BACKEND": backend.address, "TILE_SIZE": 128, "SIMPLIFY": 0.0, "MIN_AREA": 0.0,
        "OUTPUT": str(output)}, feedback)
    assert result["OUTPUT"] == str(output)

    features = _read_output(output)
    assert len(features) >= 1
    by_prompt: dict[str, list[QgsFeature]] = {}
    for feature in features:
        assert feature["engine"] == "sam"
        assert feature["model"] == "sam_tiny"
        assert feature["task"] == "interactive"
        assert feature["source_layer"] == "scene"
        assert isinstance(feature["score"], float) and np.isfinite(feature["score"])
        assert feature["created"].endswith("+00:00")
        geometry = feature.geometry()
        assert geometry.area() > 0
        _assert_on_pixel_grid(geometry)
        by_prompt.setdefault(feature["prompt"], []).append(feature)
    # The background point went with A's request only (it is outside B's window).
    assert set(by_prompt) <= {"1 positive, 1 negative points", "1 positive, 0 negative points"}
    for prompt, centre in (("1 positive, 1 negative points", centre_a),
                           ("1 positive, 0 negative points", centre_b)):
        # Near its point: inside the 128-px (64 m) window around it (+- 1 px: the point went
        # through EPSG:4326 and back).
        for feature in by_prompt.get(prompt, []):
            box = feature.geometry().boundingBox()
            assert box.xMinimum() >= centre[0] - 65 * PIXEL
            assert box.xMaximum() <= centre[0] + 65 * PIXEL
            assert box.yMinimum() >= centre[1] - 65 * PIXEL
            assert box.yMaximum() <= centre[1] + 65 * PIXEL
    # The point outside the raster was reported and skipped, not a crash.
    assert any("outside the raster" in error for error in feedback.errors)
    assert any("polygon(s) written, 1 point(s) skipped" in info for info in feedback.infos)
    assert feedback.progress_values and feedback.progress_values[-1] == pytest.approx(100.0)


def test_without_a_label_field_every_point_is_foreground(provider, scene, backend, tmp_path):
    _, raster = scene
    points = _point_layer([_map(80.5, 75.5), _map(60.5, 100.5)], labels=[1, 0])
    output = tmp_path / "all_fg.gpkg"
    feedback = RecordingFeedback()
    _run("unigeoseg:segmentbypoints", {
        "INPUT": raster, "POINTS": points, "BACKEND": backend.address,
        "TILE_SIZE": 1024, "OUTPUT": str(output)}, feedback)
    assert any("2 foreground and 0 background" in info for info in feedback.infos)
    features = _read_output(output)
    assert features and {f["prompt"] for f in features} <= {"1 positive, 0 negative points"}
    for feature in features:
        _assert_on_pixel_grid(feature.geometry())


def test_the_text_algorithm_without_unigeoseg_asks_the_default_model_and_says_what_it_said(
        provider, scene, backend, tmp_path):
    _, raster = scene
    feedback = RecordingFeedback()
    out = tmp_path / "text.gpkg"
    _run("unigeoseg:segmentbytext", {
        "INPUT": raster, "PROMPT": "the yellow roof", "TASK": 0,
        "BACKEND": backend.address, "OUTPUT": str(out)}, feedback)
    print(feedback.warnings)
    # the shipped default model knows no roofs: no polygons, and its message once
    assert _read_output(out) == []
    said = [w for w in feedback.warnings if w.startswith("default:")]
    assert len(said) == 1 and "roof" in said[0], feedback.warnings


def test_no_backend_is_a_clear_error(provider, scene, tmp_path):
    _, raster = scene
    address = f"tcp://127.0.0.1:{_free_loopback_port()}"
    start = time.monotonic()
    message = _run_failing("unigeoseg:segmentbypoints", {
        "INPUT": raster, "POINTS": _point_layer([_map(80, 75)]), "BACKEND": address,
        "OUTPUT": str(tmp_path / "none.gpkg")})
    expected = f"No backend at {address}: start it with `unigeoseg serve`"
    assert expected in message, message
    assert time.monotonic() - start < 20


# ---------------------------------------------------------------------------- scripted backend

class ScriptedBackend:
    """A protocol-speaking ROUTER on 127.0.0.1 in a thread, answering with ``handler``.

    ``handler(header, arrays)`` returns a result dict (ok reply), an ``(code, message)`` tuple
    (error reply) or None (no reply). Every request is recorded.
    """

    def __init__(self, handler):
        import zmq
        from qgis_plugin.unigeoseg_protocol import (
            decode_message,
            encode_message,
            error_header,
            ok_header,
        )

        self._codec = (decode_message, encode_message, ok_header, error_header)
        self.handler = handler
        self.requests: list[tuple[float, dict, dict]] = []
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind("tcp://127.0.0.1:*")
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        decode_message, encode_message, ok_header, error_header = self._codec
        while not self._stop.is_set():
            if not self._socket.poll(50):
                continue
            client, *frames = self._socket.recv_multipart()
            message = decode_message(frames)
            self.requests.append((time.monotonic(), message.header, message.arrays))
            answer = self.handler(message.header, message.arrays)
            if answer is None:
                continue
            if isinstance(answer, tuple):
                header = error_header(message.id, answer[0], answer[1])
            else:
                header = ok_header(message.id, answer)
            self._socket.send_multipart([client, *encode_message(header)])

    def ops(self) -> list[str]:
        return [header["op"] for _, header, _ in self.requests]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._socket.close(linger=0)
        self._context.term()


def _hello(text_available: bool) -> dict:
    engines = {"sam": {"available": True, "loaded": False, "model": None,
                       "tasks": ["interactive"]}}
    engines["unigeoseg"] = ({"available": True, "loaded": True, "model": "unigeoseg_test",
                             "tasks": ["referring", "reasoning"]} if text_available
                            else {"available": False, "reason": "not in this version"})
    return {"protocol_version": 1, "backend_version": "test", "engines": engines,
            "device": "cpu", "gpu": None, "max_message_bytes": 256 << 20,
            "authenticated": False}


def _centre_square(params: dict, arrays: dict) -> dict:
    """A 2 x 2 pixel square in the middle of the tile, in the tile CRS."""
    x0, dx, _, y0, _, dy = params["georeference"]["geotransform"]
    height, width = arrays["pixels"].shape[:2]
    c, r = width // 2, height // 2
    ring = [[x0 + (c + i) * dx, y0 + (r + j) * dy] for i, j in ((0, 0), (0, 2), (2, 2), (2, 0))]
    ring.append(ring[0])
    props = {"score": 0.5, "engine": "unigeoseg", "model": "unigeoseg_test",
             "task": params["prompt"]["task"], "prompt": params["prompt"]["text"],
             "created": "2024-01-01T00:00:00+00:00"}
    return {"image_id": "x", "score": 0.5, "engine": "unigeoseg", "model": "unigeoseg_test",
            "features": {"type": "FeatureCollection",
                         "features": [{"type": "Feature", "properties": props,
                                       "geometry": {"type": "Polygon", "coordinates": [ring]}}]}}


@pytest.fixture
def scripted():
    backends: list[ScriptedBackend] = []

    def factory(handler) -> ScriptedBackend:
        backends.append(ScriptedBackend(handler))
        return backends[-1]

    yield factory
    for backend in backends:
        backend.close()


def test_text_prompts_are_sent_tile_by_tile(provider, scene, scripted, tmp_path):
    _, raster = scene

    def handler(header, arrays):
        if header["op"] == "hello":
            return _hello(text_available=True)
        if header["op"] == "segment":
            return _centre_square(header["params"], arrays)
        return ("unknown_op", header["op"])

    backend = scripted(handler)
    output = tmp_path / "text.gpkg"
    extent = f"{ORIGIN[0] + 5.0},{ORIGIN[0] + 65.0},{ORIGIN[1] - 70.0},{ORIGIN[1] - 10.0} [{UTM}]"
    feedback = RecordingFeedback()
    _run("unigeoseg:segmentbytext", {
        "INPUT": raster, "PROMPT": "the yellow roof", "TASK": 1, "EXTENT": extent,
        "BACKEND": backend.address, "TILE_SIZE": 100, "OUTPUT": str(output)}, feedback)
    segments = [(header, arrays) for _, header, arrays in backend.requests
                if header["op"] == "segment"]
    # Pixels 10..130 x 20..140 -> tiles of 100 px overlapping by 50 (at most half a tile):
    # 2 x 2, the last of each row and column moved back to end at the extent's edge.
    windows = []
    for header, arrays in segments:
        params = header["params"]
        assert params["prompt"] == {"task": "reasoning", "text": "the yellow roof"}
        assert params["options"]["engine"] == "unigeoseg"
        x0, dx, _, y0, _, dy = params["georeference"]["geotransform"]
        assert (dx, dy) == (PIXEL, -PIXEL) and params["georeference"]["crs"] == UTM
        col0, row0 = (x0 - ORIGIN[0]) / PIXEL, (ORIGIN[1] - y0) / PIXEL
        height, width = arrays["pixels"].shape[:2]
        windows.append((col0, row0, width, height))
    assert windows == [(10, 20, 100, 100), (30, 20, 100, 100), (10, 40, 100, 100),
                       (30, 40, 100, 100)]
    features = _read_output(output)
    assert len(features) == 4
    for feature in features:
        assert feature["prompt"] == "the yellow roof" and feature["task"] == "reasoning"
        assert feature["engine"] == "unigeoseg" and feature["score"] == 0.5
        assert feature.geometry().area() == pytest.approx(4 * PIXEL * PIXEL, rel=1e-12)
        _assert_on_pixel_grid(feature.geometry())


def test_text_without_the_engine_gives_the_backend_reason(provider, scene, scripted, tmp_path):
    _, raster = scene
    backend = scripted(lambda header, arrays: _hello(False) if header["op"] == "hello" else None)
    message = _run_failing("unigeoseg:segmentbytext", {
        "INPUT": raster, "PROMPT": "roofs", "BACKEND": backend.address,
        "OUTPUT": str(tmp_path / "t.gpkg")})
    assert re.search(r"text engine is not available .* \(not in this version\)", message), \
        message
    assert backend.ops() == ["hello"]


def test_cancel_is_honoured_quickly_and_sent_to_the_backend(provider, scene, scripted, tmp_path):
    _, raster = scene
    feedback = RecordingFeedback()
    cancelled_at: list[float] = []
    got_cancel = threading.Event()

    def handler(header, arrays):
        if header["op"] == "hello":
            return _hello(text_available=False)
        if header["op"] == "segment":  # never answered: the analyst presses Cancel instead
            cancelled_at.append(time.monotonic())
            feedback.cancel()
            return None
        if header["op"] == "cancel":
            got_cancel.set()
            return {"target": header["params"]["target"], "cancelled": True, "was": "running"}
        return ("unknown_op", header["op"])

    backend = scripted(handler)
    output = tmp_path / "cancel.gpkg"
    start = time.monotonic()
    _run("unigeoseg:segmentbypoints", {
        "INPUT": raster, "POINTS": _point_layer([_map(80.5, 75.5), _map(220.5, 220.5)]),
        "BACKEND": backend.address, "TILE_SIZE": 128, "OUTPUT": str(output)}, feedback)
    assert time.monotonic() - start < 30
    assert got_cancel.wait(10)
    assert backend.ops() == ["hello", "segment", "cancel"]
    segment_id = backend.requests[1][1]["id"]
    cancel_time, cancel_header, _ = backend.requests[2]
    assert cancel_header["params"] == {"target": segment_id}
    assert cancel_time - cancelled_at[0] < 1.0  # polled every 0.1 s
    assert _read_output(output) == []


def test_backend_errors_become_readable_exceptions(provider, scene, scripted, tmp_path):
    _, raster = scene

    def handler(header, arrays):
        if header["op"] == "hello":
            return _hello(text_available=False)
        return ("internal", "CUDA out of memory")

    backend = scripted(handler)
    message = _run_failing("unigeoseg:segmentbypoints", {
        "INPUT": raster, "POINTS": _point_layer([_map(80.5, 75.5)]),
        "BACKEND": backend.address, "OUTPUT": str(tmp_path / "e.gpkg")})
    assert re.search(r"refused the request \(internal\): CUDA out of memory", message), message


def test_skippable_errors_skip_one_point(provider, scene, scripted, tmp_path):
    _, raster = scene
    answers = iter([("no_valid_pixels", "every pixel of the tile is nodata")])

    def handler(header, arrays):
        if header["op"] == "hello":
            return _hello(text_available=False)
        answer = next(answers, None)
        if answer is not None:
            return answer
        result = _centre_square({**header["params"], "prompt": {"task": "interactive",
                                                                "text": "1 positive"}}, arrays)
        return result

    backend = scripted(handler)
    feedback = RecordingFeedback()
    output = tmp_path / "skip.gpkg"
    _run("unigeoseg:segmentbypoints", {
        "INPUT": raster, "POINTS": _point_layer([_map(80.5, 75.5), _map(220.5, 220.5)]),
        "BACKEND": backend.address, "TILE_SIZE": 64, "OUTPUT": str(output)}, feedback)
    assert any("nodata; skipped" in error for error in feedback.errors)
    assert len(_read_output(output)) == 1
    segments = [h for _, h, _ in backend.requests if h["op"] == "segment"]
    assert len(segments) == 2
    assert [len(s["params"]["prompt"]["points"]) for s in segments] == [1, 1]


def test_text_falls_back_to_the_default_model_and_reports_its_message_once(provider, scene,
                                                                           scripted, tmp_path):
    _, raster = scene
    said = "The default model did not understand 'the yellow roof'. It knows: water, tree."

    def handler(header, arrays):
        if header["op"] == "hello":
            hello = _hello(text_available=False)
            hello["engines"]["sam"] = {"available": False, "reason": "no checkpoint"}
            hello["engines"]["default"] = {"available": True, "loaded": False,
                                           "model": "default-test@0.0.1",
                                           "tasks": ["interactive", "referring", "reasoning"]}
            return hello
        if header["op"] == "segment":
            return {**_centre_square(header["params"], arrays), "engine": "default",
                    "message": said}
        return ("unknown_op", header["op"])

    backend = scripted(handler)
    feedback = RecordingFeedback()
    _run("unigeoseg:segmentbytext", {
        "INPUT": raster, "PROMPT": "the yellow roof", "TASK": 0, "BACKEND": backend.address,
        "TILE_SIZE": 100, "OUTPUT": str(tmp_path / "text.gpkg")}, feedback)
    engines = [header["params"]["options"]["engine"] for _, header, _ in backend.requests
               if header["op"] == "segment"]
    assert len(engines) > 1 and set(engines) == {"default"}
    assert [w for w in feedback.warnings if said in w] == [f"default: {said}"]
