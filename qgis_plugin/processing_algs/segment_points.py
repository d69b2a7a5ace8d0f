"""Processing algorithm "Segment by points": one SAM prompt per foreground point of a point
layer, on a window of the raster around it."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    NULL,
    QgsCoordinateTransform,
    QgsCsException,
    QgsPointXY,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
)
from qgis.PyQt.QtCore import QVariant

from ..core.engine_choice import engine_for
from ..core.raster_window import RasterWindowError
from ..core.settings import PluginSettings
from ..unigeoseg_protocol.params import Prompt, SegmentOptions
from .backend_session import Cancelled
from .base import UniGeoSegAlgorithm, tr


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
            "Segments the object under each foreground point of a point layer with SAM (or "
            "the default model when the backend offers no SAM), through a running UniGeoSeg "
            "backend (`unigeoseg serve`).\n\n"
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
        simplify = max(self.parameterAsDouble(parameters, self.SIMPLIFY, context), 0.0)
        min_area = max(self.parameterAsDouble(parameters, self.MIN_AREA, context), 0.0)
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
            engine_name = engine_for(hello, "interactive")
            engine = hello.engines.get(engine_name)
            if engine is None or not engine.available:
                reason = (engine.reason if engine is not None else None) \
                    or "its SAM engine is not available"
                raise QgsProcessingException(
                    f"The backend at {session.address} cannot segment points: {reason}")
            options = SegmentOptions(engine=engine_name, simplify=simplify, min_area=min_area)
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
        if not self._grid.window.contains(x, y):
            feedback.reportError(f"Point {fid} ({x:.6g}, {y:.6g} in the raster CRS) is outside "
                                 f"the raster; skipped", False)
            return None
        try:
            tile = self.read_around(x, y, tile_px, feedback)
        except RasterWindowError as exc:
            feedback.reportError(f"Point {fid}: {exc}; skipped", False)
            return None
        window = tile.window
        negatives = tuple((bx, by) for bx, by in background if window.contains(bx, by))
        prompt = Prompt(points=((x, y), *negatives), labels=(1,) + (0,) * len(negatives),
                        task="interactive")
        reply = self.segment_or_skip(session, tile, prompt, options, f"Point {fid}", feedback)
        if reply is None:
            return None
        written = self.write_result(sink, fields, reply.features, parameters,
                                    {"engine": reply.engine, "model": reply.model,
                                     "score": reply.score})
        feedback.pushInfo(f"Point {fid}: {written} polygon(s), score "
                          f"{reply.score:.3f}, {len(negatives)} background "
                          f"point(s), window {window.width}x{window.height} at pixel "
                          f"({window.col0}, {window.row0})")
        return written
