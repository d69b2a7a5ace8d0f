"""Processing algorithm "Segment by points", and what both UniGeoSeg algorithms share.

Shared here (imported by segment_text.py): the backend session (hello check, requests that
honour cancellation, readable errors), the output fields and GeoJSON → QGIS feature
conversion, and the algorithm base class.

pyzmq and the protocol ``Client`` are imported only when an algorithm runs, so the provider
loads (and lists its algorithms) in a QGIS without pyzmq; running one then fails with a
QgsProcessingException that says how to install it.
"""

from __future__ import annotations

import time
from typing import Any

from qgis.core import (
    NULL,
    QgsCoordinateTransform,
    QgsCsException,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsLineString,
    QgsPointXY,
    QgsPolygon,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QCoreApplication, QVariant

from ..core.raster_window import RasterGrid, RasterWindowError, raster_grid, read_window_around
from ..core.settings import PluginSettings
from ..unigeoseg_protocol.errors import ErrorCode, RemoteError, RequestTimeout
from ..unigeoseg_protocol.params import Prompt, SegmentOptions

#: Seconds to wait for the backend's answer to ``hello`` before saying there is none.
HELLO_TIMEOUT_S = 3.0
#: Seconds between two checks of the cancel button while a request runs.
POLL_S = 0.1
#: Extra seconds to wait past a request's own deadline (the backend answers ``timeout``).
GRACE_S = 5.0
#: Errors that concern one point or tile only: it is reported and skipped.
SKIPPABLE_CODES = {ErrorCode.OUT_OF_BOUNDS.value, ErrorCode.NO_VALID_PIXELS.value,
                   ErrorCode.EMPTY_PROMPT.value}

PYZMQ_MISSING = (
    "UniGeoSeg needs the Python package pyzmq in QGIS's own Python to talk to its backend, and "
    "it is not installed ({error}). Install it, then restart QGIS: on Debian/Ubuntu `sudo apt "
    "install python3-zmq`; on Windows, in the OSGeo4W Shell, `python -m pip install pyzmq`; on "
    "macOS `/Applications/QGIS.app/Contents/MacOS/bin/python3 -m pip install pyzmq`; or let the "
    "UniGeoSeg panel install it into a plugin-private folder.")

OUTPUT_FIELDS = (("prompt", QVariant.Type.String), ("task", QVariant.Type.String),
                 ("engine", QVariant.Type.String), ("model", QVariant.Type.String),
                 ("score", QVariant.Type.Double), ("source_layer", QVariant.Type.String),
                 ("created", QVariant.Type.String))


def tr(text: str) -> str:
    return QCoreApplication.translate("UniGeoSeg", text)


def output_fields() -> QgsFields:
    """Attributes of every output polygon (the backend's provenance plus the source layer)."""
    fields = QgsFields()
    for name, kind in OUTPUT_FIELDS:
        fields.append(QgsField(name, kind))
    return fields


def load_client_class():
    """The protocol ``Client`` class, or a QgsProcessingException when pyzmq is missing."""
    try:
        import zmq  # noqa: F401
    except ImportError as exc:
        raise QgsProcessingException(PYZMQ_MISSING.format(error=exc)) from exc
    from ..unigeoseg_protocol.client import Client

    return Client


class Cancelled(Exception):
    """The analyst pressed Cancel while waiting for the backend."""


def remote_error_message(exc: RemoteError, address: str) -> str:
    """A sentence for an ``ok: false`` reply, with what to do about the common ones."""
    code = str(exc.code)
    hints = {
        ErrorCode.ENGINE_UNAVAILABLE.value: "",
        ErrorCode.PAYLOAD_TOO_LARGE.value: " Use a smaller tile size.",
        ErrorCode.QUEUE_FULL.value: " The backend is busy: try again in a moment.",
        ErrorCode.TIMEOUT.value: " Raise the request timeout in the UniGeoSeg settings, use a "
                                 "smaller tile size, or a backend with a GPU.",
        ErrorCode.SHUTTING_DOWN.value: " Start it again with `unigeoseg serve`.",
        ErrorCode.INTERNAL.value: " The backend's log has the details.",
    }
    return f"The backend at {address} refused the request ({code}): {exc.message}" \
           f"{hints.get(code, '')}"


class BackendSession:
    """One connection to the backend for one algorithm run.

    Every wait is a series of short waits, so that the Cancel button is honoured within
    :data:`POLL_S`; a cancelled request is cancelled on the backend too (``cancel`` op).
    """

    def __init__(self, address: str, feedback, timeout_s: float, curve=None):
        self.address = address
        self.feedback = feedback
        self.timeout_s = timeout_s
        client_class = load_client_class()
        try:
            self.client = client_class(address, timeout_s=timeout_s, curve=curve)
        except Exception as exc:  # noqa: BLE001 - zmq.ZMQError for a malformed address
            raise QgsProcessingException(
                f"Invalid backend address {address!r} ({exc}): use e.g. "
                f"tcp://127.0.0.1:5557") from exc

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> BackendSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _cancel_on_backend(self, request_id: str) -> None:
        try:
            self.client.send("cancel", {"target": request_id}, timeout_s=1.0)
        except Exception:  # noqa: BLE001 - best effort: the socket is closed next
            pass

    def request(self, op: str, params: dict[str, Any] | None = None,
                arrays: dict[str, Any] | None = None, timeout_s: float | None = None):
        """Send a request and wait for its final reply (a protocol ``Message``).

        Raises:
            Cancelled: the feedback was cancelled (the backend was told to cancel too).
            RequestTimeout: no reply within ``timeout_s`` plus a grace period.
            RemoteError: the backend answered with an error.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = self.client.send(op, params, arrays, timeout_s=timeout)
        grace = GRACE_S if op in ("set_image", "segment") else 0.0
        deadline = time.monotonic() + timeout + grace

        def on_progress(done: int, total: int, message: str) -> None:
            self.feedback.pushDebugInfo(f"backend: {message} ({done}/{total})")

        while True:
            if self.feedback.isCanceled():
                self._cancel_on_backend(request_id)
                raise Cancelled(request_id)
            wait = min(POLL_S, max(deadline - time.monotonic(), 0.0))
            try:
                return self.client.receive(request_id, timeout_s=wait, on_progress=on_progress)
            except RequestTimeout:
                if time.monotonic() >= deadline:
                    self._cancel_on_backend(request_id)
                    raise RequestTimeout(f"no reply from {self.address} within {timeout:.0f} s",
                                         request_id=request_id) from None

    def hello(self) -> dict[str, Any]:
        """The backend's ``hello``; QgsProcessingException when nobody answers."""
        try:
            return self.request("hello", timeout_s=HELLO_TIMEOUT_S).header["result"]
        except RequestTimeout as exc:
            raise QgsProcessingException(
                f"No backend at {self.address}: start it with `unigeoseg serve` (or from the "
                f"UniGeoSeg plugin), or set the right backend address. It did not answer within "
                f"{HELLO_TIMEOUT_S:.0f} s.") from exc
        except RemoteError as exc:
            raise QgsProcessingException(remote_error_message(exc, self.address)) from exc

    def segment(self, window, prompt: Prompt, options: SegmentOptions) -> dict[str, Any]:
        """Segment one raster window inline (pixels + georeference); returns ``result``.

        The backend hashes the pixels, so a window sent again reuses its cached embedding.
        """
        params = {"prompt": prompt.to_wire(), "options": options.to_wire(),
                  "georeference": window.georeference.to_wire(),
                  "raster": window.raster.to_wire()}
        try:
            reply = self.request("segment", params, {"pixels": window.pixels})
        except RequestTimeout as exc:
            raise QgsProcessingException(
                f"The backend at {self.address} did not answer within {self.timeout_s:.0f} s: "
                f"raise the request timeout in the UniGeoSeg settings, use a smaller tile "
                f"size, or check that the backend still runs.") from exc
        return reply.header["result"]


def _ring(coords: list) -> QgsLineString:
    return QgsLineString([float(c[0]) for c in coords], [float(c[1]) for c in coords])


def _polygon(rings: list) -> QgsPolygon | None:
    if not rings or not rings[0]:
        return None
    polygon = QgsPolygon()
    polygon.setExteriorRing(_ring(rings[0]))
    for interior in rings[1:]:
        polygon.addInteriorRing(_ring(interior))
    return polygon


def geojson_polygons(geometry: dict[str, Any] | None) -> list[QgsGeometry]:
    """QGIS polygons from a GeoJSON Polygon / MultiPolygon, coordinates copied bit for bit
    (one geometry per part; other geometry types give none)."""
    if not geometry:
        return []
    kind, coords = geometry.get("type"), geometry.get("coordinates") or []
    parts = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    return [QgsGeometry(p) for p in (_polygon(rings) for rings in parts) if p is not None]


def features_from_result(result: dict[str, Any], fields: QgsFields,
                         source_layer: str) -> list[QgsFeature]:
    """Output features from a ``segment`` result (GeoJSON in the tile CRS = the raster CRS)."""
    features = []
    collection = result.get("features") or {}
    for item in collection.get("features") or []:
        props = item.get("properties") or {}
        score = props.get("score", result.get("score"))
        attributes = [str(props.get("prompt", "")), str(props.get("task", "")),
                      str(props.get("engine", result.get("engine", ""))),
                      str(props.get("model", result.get("model", ""))),
                      float(score) if score is not None else NULL, source_layer,
                      str(props.get("created", ""))]
        for geometry in geojson_polygons(item.get("geometry")):
            feature = QgsFeature(fields)
            feature.setGeometry(geometry)
            feature.setAttributes(attributes)
            features.append(feature)
    return features


class UniGeoSegAlgorithm(QgsProcessingAlgorithm):
    """Common parameters and plumbing of the UniGeoSeg algorithms."""

    INPUT = "INPUT"
    BACKEND = "BACKEND"
    TILE_SIZE = "TILE_SIZE"
    SIMPLIFY = "SIMPLIFY"
    MIN_AREA = "MIN_AREA"
    OUTPUT = "OUTPUT"

    def __init__(self):
        super().__init__()
        self._layer_name = ""
        self._crs = None
        self._grid: RasterGrid | None = None
        self._provider = None
        self._layer = None

    def group(self) -> str:
        return tr("Segmentation")

    def groupId(self) -> str:
        return "segmentation"

    def icon(self):
        provider = self.provider()
        return provider.icon() if provider is not None else super().icon()

    def add_raster_parameter(self) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.INPUT, tr("Raster layer (read at its native resolution)")))

    def add_backend_parameters(self, settings: PluginSettings) -> None:
        self.addParameter(QgsProcessingParameterString(
            self.BACKEND, tr("Backend address"), defaultValue=settings.backend_address))
        self.addParameter(QgsProcessingParameterNumber(
            self.TILE_SIZE, tr("Tile size (pixels)"),
            type=QgsProcessingParameterNumber.Type.Integer,
            defaultValue=settings.tile_px if settings.tile_px > 0 else 1024,
            minValue=16, maxValue=8192))

    def add_vector_options(self, settings: PluginSettings, advanced: bool = False) -> None:
        for name, label, default in (
                (self.SIMPLIFY, "Simplification tolerance (raster CRS map units, 0 = exact "
                                "pixel edges)", settings.simplify),
                (self.MIN_AREA, "Minimum polygon area (raster CRS square map units)",
                 settings.min_area)):
            param = QgsProcessingParameterNumber(
                name, tr(label), type=QgsProcessingParameterNumber.Type.Double,
                defaultValue=max(float(default), 0.0), minValue=0.0)
            if advanced:
                param.setFlags(param.flags()
                               | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
            self.addParameter(param)

    def add_output_parameter(self) -> None:
        # A GeoPackage unless the analyst picks another format (Processing's default).
        self.addParameter(QgsProcessingParameterFeatureSink(
            self.OUTPUT, tr("Segmented polygons"), QgsProcessing.SourceType.TypeVectorPolygon))

    def prepareAlgorithm(self, parameters, context, feedback) -> bool:
        # On the main thread: clone the provider here, read it in processAlgorithm's thread.
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(self.invalidRasterError(parameters, self.INPUT))
        provider = layer.dataProvider().clone() if layer.dataProvider() else None
        if provider is None:
            raise QgsProcessingException(f"Cannot read raster layer {layer.name()!r}")
        try:
            self._grid = raster_grid(layer, provider)
        except RasterWindowError as exc:
            raise QgsProcessingException(str(exc)) from exc
        self._provider = provider
        self._layer = layer
        self._layer_name = layer.name()
        self._crs = layer.crs()
        return True

    def processAlgorithm(self, parameters, context, feedback) -> dict[str, Any]:
        if feedback is None:  # run() without a feedback object
            feedback = QgsProcessingFeedback()
        try:
            return self.run_segmentation(parameters, context, feedback)
        finally:
            # Release the provider clone and the layer as soon as the run ends: QGIS objects
            # that Python keeps alive past QgsApplication.exitQgis() crash the interpreter.
            self._provider = None
            self._layer = None
            self._grid = None

    def run_segmentation(self, parameters, context, feedback) -> dict[str, Any]:
        raise NotImplementedError

    def backend_address(self, parameters, context) -> str:
        address = (self.parameterAsString(parameters, self.BACKEND, context) or "").strip()
        return address or PluginSettings.load().backend_address

    def open_session(self, parameters, context, feedback) -> BackendSession:
        load_client_class()  # says clearly when pyzmq is missing
        from ..core.curve import CurveKeyError, curve_keys

        settings = PluginSettings.load()
        timeout = settings.request_timeout_s if settings.request_timeout_s > 0 else 120.0
        try:
            curve = curve_keys(settings)  # the panel's keys (Backend key, Your key)
        except CurveKeyError as exc:
            raise QgsProcessingException(str(exc)) from exc
        return BackendSession(self.backend_address(parameters, context), feedback, timeout,
                              curve)

    def open_sink(self, parameters, context):
        fields = output_fields()
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields,
                                             QgsWkbTypes.Type.Polygon, self._crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        return sink, dest_id, fields

    def write(self, sink, features: list[QgsFeature], parameters) -> None:
        for feature in features:
            if not sink.addFeature(feature, QgsFeatureSink.Flag.FastInsert):
                raise QgsProcessingException(self.writeFeatureError(sink, parameters,
                                                                    self.OUTPUT))

    def read_window(self, x: float, y: float, tile_px: int, feedback):
        return read_window_around(self._layer, x, y, tile_px, grid=self._grid,
                                  provider=self._provider, feedback=feedback)


def parse_label(value: Any) -> int | None:
    """1 (foreground) or 0 (background) from a field value; None for NULL.

    Raises:
        ValueError: any other value.
    """
    if value is None or value == NULL or (isinstance(value, QVariant) and value.isNull()):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if value in (0, 1):
            return int(value)
        raise ValueError(value)
    text = str(value).strip().lower()
    if text in ("1", "1.0", "fg", "foreground", "positive", "pos", "true", "yes", "+"):
        return 1
    if text in ("0", "0.0", "bg", "background", "negative", "neg", "false", "no", "-"):
        return 0
    raise ValueError(value)


class SegmentByPointsAlgorithm(UniGeoSegAlgorithm):
    """One polygon set per foreground point, on a window of the raster around it."""

    POINTS = "POINTS"
    LABEL_FIELD = "LABEL_FIELD"

    def name(self) -> str:
        return "segmentbypoints"

    def displayName(self) -> str:
        return tr("Segment by points")

    def shortHelpString(self) -> str:
        return tr(
            "Segments the object under each foreground point of a point layer with SAM, "
            "through a running UniGeoSeg backend (`unigeoseg serve`).\n\n"
            "For every foreground point, a window of 'Tile size' pixels around it is read from "
            "the raster at its native resolution (shifted to stay inside the raster) and sent "
            "with the point and the background points that fall in the same window. The "
            "polygons follow the raster's pixel edges exactly and are written in the raster's "
            "CRS, with the attributes prompt, task, engine, model, score, source_layer and "
            "created.\n\n"
            "Label field: 1 = foreground, 0 = background (also fg/bg, true/false); empty or "
            "not set = foreground. Points are reprojected to the raster CRS; points outside "
            "the raster are reported and skipped.\n\n"
            "Simplification and minimum area are in the raster CRS's units (0 = none).")

    def createInstance(self) -> SegmentByPointsAlgorithm:
        return SegmentByPointsAlgorithm()

    def initAlgorithm(self, config=None) -> None:
        settings = PluginSettings.load()
        self.add_raster_parameter()
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.POINTS, tr("Prompt points"), [QgsProcessing.SourceType.TypeVectorPoint]))
        self.addParameter(QgsProcessingParameterField(
            self.LABEL_FIELD, tr("Label field (1 = foreground, 0 = background)"),
            parentLayerParameterName=self.POINTS,
            type=QgsProcessingParameterField.DataType.Any, optional=True))
        self.add_backend_parameters(settings)
        self.add_vector_options(settings)
        self.add_output_parameter()

    def _read_points(self, source, label_field: str, context, feedback):
        """(foreground [(fid, x, y)], background [(x, y)]) in the raster CRS."""
        transform = QgsCoordinateTransform(source.sourceCrs(), self._crs,
                                           context.transformContext())
        label_index = source.fields().lookupField(label_field) if label_field else -1
        if label_field and label_index < 0:
            raise QgsProcessingException(f"The point layer has no field {label_field!r}")
        foreground, background, nulls = [], [], 0
        for feature in source.getFeatures():
            label = 1
            if label_index >= 0:
                value = feature.attribute(label_index)
                try:
                    label = parse_label(value)
                except ValueError:
                    feedback.pushWarning(f"Point {feature.id()}: label {value!r} is not 0 or 1 "
                                         f"(foreground or background); skipped")
                    continue
                if label is None:
                    nulls += 1
                    label = 1
            geometry = feature.geometry()
            if geometry is None or geometry.isEmpty():
                feedback.pushWarning(f"Point {feature.id()} has no geometry; skipped")
                continue
            for vertex in geometry.vertices():
                try:
                    point = transform.transform(QgsPointXY(vertex.x(), vertex.y()))
                except QgsCsException as exc:
                    feedback.reportError(f"Point {feature.id()} cannot be transformed to the "
                                         f"raster CRS ({exc}); skipped", False)
                    continue
                if label == 1:
                    foreground.append((feature.id(), point.x(), point.y()))
                else:
                    background.append((point.x(), point.y()))
        if nulls:
            feedback.pushWarning(f"{nulls} point(s) with an empty label were used as "
                                 f"foreground points")
        return foreground, background

    def run_segmentation(self, parameters, context, feedback) -> dict[str, Any]:
        source = self.parameterAsSource(parameters, self.POINTS, context)
        if source is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, self.POINTS))
        label_field = self.parameterAsString(parameters, self.LABEL_FIELD, context) or ""
        tile_px = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        options = SegmentOptions(
            engine="sam", simplify=max(self.parameterAsDouble(parameters, self.SIMPLIFY,
                                                              context), 0.0),
            min_area=max(self.parameterAsDouble(parameters, self.MIN_AREA, context), 0.0))
        foreground, background = self._read_points(source, label_field, context, feedback)
        if not foreground:
            raise QgsProcessingException("The point layer has no foreground point: give at "
                                         "least one point labelled 1 (or no label field).")
        feedback.pushInfo(f"{len(foreground)} foreground and {len(background)} background "
                          f"point(s) on {self._layer_name!r}")

        with self.open_session(parameters, context, feedback) as session:
            try:
                hello = session.hello()
            except Cancelled:
                return {}
            sam = (hello.get("engines") or {}).get("sam") or {}
            if not sam.get("available", False):
                raise QgsProcessingException(
                    f"The backend at {session.address} cannot segment points: "
                    f"{sam.get('reason', 'its SAM engine is not available')}")
            sink, dest_id, fields = self.open_sink(parameters, context)
            written = skipped = 0
            for index, (fid, x, y) in enumerate(foreground):
                if feedback.isCanceled():
                    break
                try:
                    count = self._segment_point(session, sink, fields, parameters, fid, x, y,
                                                background, tile_px, options, feedback)
                except Cancelled:
                    break
                if count is None:
                    skipped += 1
                else:
                    written += count
                feedback.setProgress(100.0 * (index + 1) / len(foreground))
        if feedback.isCanceled():
            feedback.pushInfo("Cancelled: the output holds the polygons written so far")
        feedback.pushInfo(f"{written} polygon(s) written, {skipped} point(s) skipped")
        return {self.OUTPUT: dest_id}

    def _segment_point(self, session, sink, fields, parameters, fid, x, y, background,
                       tile_px, options, feedback) -> int | None:
        """Segment one foreground point; the number of polygons written, None if skipped."""
        if not self._grid.contains(x, y):
            feedback.reportError(f"Point {fid} ({x:.6g}, {y:.6g} in the raster CRS) is outside "
                                 f"the raster; skipped", False)
            return None
        try:
            window = self.read_window(x, y, tile_px, feedback)
        except RasterWindowError as exc:
            feedback.reportError(f"Point {fid}: {exc}; skipped", False)
            return None
        negatives = tuple((bx, by) for bx, by in background if window.contains(bx, by))
        prompt = Prompt(points=((x, y), *negatives), labels=(1,) + (0,) * len(negatives),
                        task="interactive")
        try:
            result = session.segment(window, prompt, options)
        except RemoteError as exc:
            if str(exc.code) in SKIPPABLE_CODES:
                feedback.reportError(f"Point {fid}: {exc.message}; skipped", False)
                return None
            raise QgsProcessingException(remote_error_message(exc, session.address)) from exc
        features = features_from_result(result, fields, self._layer_name)
        self.write(sink, features, parameters)
        feedback.pushInfo(f"Point {fid}: {len(features)} polygon(s), score "
                          f"{float(result.get('score', 0.0)):.3f}, {len(negatives)} background "
                          f"point(s), window {window.width}x{window.height} at pixel "
                          f"({window.col0}, {window.row0})")
        return len(features)
