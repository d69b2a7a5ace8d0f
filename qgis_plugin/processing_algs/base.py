"""What the UniGeoSeg Processing algorithms share: their parameters, the raster they read
(prepared on the main thread, read on the algorithm's), the backend session they open and the
output they write."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsFeatureSink,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QCoreApplication

from ..core.messages import DistinctMessages
from ..core.raster_window import (
    RasterGrid,
    RasterTile,
    RasterWindowError,
    raster_grid,
    read_window,
    read_window_around,
)
from ..core.results import result_fields, to_layer_features
from ..core.settings import PluginSettings
from ..core.tiles import TileWindow
from ..unigeoseg_protocol.errors import RemoteError
from ..unigeoseg_protocol.operations import SegmentReply
from ..unigeoseg_protocol.params import Prompt, SegmentOptions
from .backend_session import (
    SKIPPABLE_CODES,
    BackendSession,
    load_client_class,
    remote_error_message,
)


def tr(text: str) -> str:
    return QCoreApplication.translate("UniGeoSeg", text)


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
        self._messages = DistinctMessages()

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
            defaultValue=settings.tile_size_px if settings.tile_size_px > 0 else 1024,
            minValue=16, maxValue=8192))

    def add_vector_options(self, settings: PluginSettings, advanced: bool = False) -> None:
        for name, label, default in (
                (self.SIMPLIFY, "Simplification tolerance (raster CRS map units, 0 = exact "
                                "pixel edges)", settings.simplify_map_units),
                (self.MIN_AREA, "Minimum polygon area (raster CRS square map units)",
                 settings.min_area_square_map_units)):
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
        self._messages = DistinctMessages()
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
        fields = result_fields()
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields,
                                             QgsWkbTypes.Type.Polygon, self._crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        return sink, dest_id, fields

    def write_result(self, sink, fields, collection: dict[str, Any], parameters,
                     defaults: dict[str, Any] | None = None) -> int:
        """Write the polygons of a FeatureCollection from the backend (in the CRS it names,
        else the raster's) into the sink (raster CRS), one feature per polygon part;
        ``defaults``: attributes the features' own properties lack (the reply's engine,
        model, score). Returns how many."""
        features = to_layer_features(collection, self._grid.window.crs, fields,
                                     self._layer_name, target_crs=self._crs, multi=False,
                                     defaults=defaults)
        for feature in features:
            if not sink.addFeature(feature, QgsFeatureSink.Flag.FastInsert):
                raise QgsProcessingException(self.writeFeatureError(sink, parameters,
                                                                    self.OUTPUT))
        return len(features)

    def read_around(self, x: float, y: float, size_px: int, feedback) -> RasterTile:
        """The raster's ``size_px`` window around a map point (raster CRS)."""
        return read_window_around(self._layer, x, y, size_px, grid=self._grid,
                                  provider=self._provider, feedback=feedback)

    def read(self, window: TileWindow, feedback) -> RasterTile:
        """The pixels of a window of the raster's grid."""
        return read_window(self._layer, self._grid, window, provider=self._provider,
                           feedback=feedback)

    def segment_or_skip(self, session: BackendSession, tile: RasterTile, prompt: Prompt,
                        options: SegmentOptions, what: str, feedback) -> SegmentReply | None:
        """The backend's reply for one tile; None (reported) when the backend says the
        tile or point alone cannot be segmented; QgsProcessingException for other errors.
        The engine's message on a reply (a prompt it did not understand, an assumption it
        made) is reported once per run, however many tiles carry it."""
        try:
            reply = session.segment(tile, prompt, options)
        except RemoteError as exc:
            if str(exc.code) in SKIPPABLE_CODES:
                feedback.reportError(f"{what}: {exc.message}; skipped", False)
                return None
            raise QgsProcessingException(remote_error_message(exc, session.address)) from exc
        if self._messages.is_new(reply.message):
            feedback.pushWarning(f"{reply.engine}: {reply.message}")
        return reply
