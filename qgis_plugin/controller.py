"""What happens between a click and a polygon in a layer (GUI thread, never blocking).

The controller turns map-tool events into prompts on a tile, previews each result as a
rubber band, and writes accepted polygons through the target layer's edit buffer. What to do
when (keep the tile, coalesce clicks, aggregate a text run's tiles) is decided by the pure
``core.interaction.Interaction``; this file does the reading, the requests and the drawing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsMapCanvas, QgsRubberBand
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtGui import QColor

from .core import results
from .core.crs import crs_from_wire, crs_to_wire
from .core.engine_choice import engine_for
from .core.interaction import Interaction, TextRun
from .core.log import log, warn
from .core.raster_read import display_bands, is_file_raster
from .core.raster_window import read_window_around
from .core.render import render_window
from .core.settings import PluginSettings
from .core.tiles import TileWindow, extent_window, tile_windows, window_around
from .tasks import BackendRequestTask, submit
from .unigeoseg_protocol.errors import ErrorCode
from .unigeoseg_protocol.operations import (
    SegmentReply,
    SegmentRequest,
    SetImageReply,
    SetImageRequest,
)
from .unigeoseg_protocol.params import Prompt, RasterOptions, SegmentOptions


@dataclass
class Accepted:
    """One accepted result, for undo."""

    layer: QgsVectorLayer
    feature_count: int


class SegmentationController(QObject):
    """Glue between the canvas, the backend connection and the layers.

    Args:
        canvas: the map canvas (its CRS is the CRS of incoming clicks).
        connection: a BackendConnection (connection.py).
        settings: tile size, resolution, simplify, min area, timeouts.
        message: ``message(text, level)`` shown to the analyst (the message bar).
    """

    previewChanged = pyqtSignal()   # a new result (or none) is on screen
    busyChanged = pyqtSignal(bool)
    accepted = pyqtSignal(int)      # number of features written

    def __init__(self, canvas: QgsMapCanvas, connection, settings: PluginSettings,
                 message: Callable[[str, Qgis.MessageLevel], None]):
        super().__init__()
        self.canvas = canvas
        self.connection = connection
        self.settings = settings
        self.message = message
        self.source_layer: QgsRasterLayer | None = None
        self.target_layer: QgsVectorLayer | None = None
        self.interaction = Interaction()
        self._accepted: list[Accepted] = []
        self._preview = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
        self._preview.setColor(QColor(0, 200, 255, 230))
        self._preview.setFillColor(QColor(0, 200, 255, 60))
        self._preview.setWidth(2)
        self._markers = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PointGeometry)
        self._markers.setIconSize(8)

    @property
    def session(self):
        """The prompts of the current object (``core.session.PromptSession``)."""
        return self.interaction.session

    # ------------------------------------------------------------------ inputs

    def set_source_layer(self, layer: QgsRasterLayer | None) -> None:
        if layer is not self.source_layer:
            self.source_layer = layer
            self.interaction = Interaction()
            self._refresh_overlays()

    def add_point(self, canvas_point: QgsPointXY, label: int) -> None:
        """A click in canvas coordinates: 1 foreground, 0 background."""
        if not self._ready():
            return
        window = self._window_for(canvas_point)
        if window is None:
            return
        x, y = self._to_window_crs(canvas_point, window)
        self.session.add_point(x, y, label)
        self._refresh_overlays()
        self._segment()

    def set_box(self, canvas_rect: QgsRectangle) -> None:
        if not self._ready():
            return
        window = self._window_for(canvas_rect.center())
        if window is None:
            return
        transform = self._transform_to(window)
        box = transform.transformBoundingBox(canvas_rect)
        self.session.set_box(box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())
        self._segment()

    def undo(self) -> None:
        """Remove the last point; with no points, undo the last accepted result."""
        if self.session.undo():
            self._refresh_overlays()
            if self.session.is_empty:
                self.session.result = None
                self._refresh_overlays()
            else:
                self._segment()
            return
        if self._accepted:
            last = self._accepted.pop()
            if last.layer.isEditable() and last.layer.undoStack().canUndo():
                last.layer.undoStack().undo()
                last.layer.triggerRepaint()
                self.message("removed the last accepted polygon(s)", Qgis.MessageLevel.Info)

    def can_undo(self) -> bool:
        """Whether Ctrl+Z has a point, a box or an accepted result of ours to take back."""
        return not self.session.is_empty or bool(self._accepted)

    def clear(self) -> None:
        """Esc: forget the current object's prompts, and cancel its request if one is out."""
        request_id = self.interaction.clear()
        if request_id is not None:
            self.connection.cancel(request_id)
        self._refresh_overlays()

    def accept(self) -> int:
        """Write the previewed polygons into the target layer; returns how many."""
        result = self.session.result
        if not result or not result.get("features"):
            self.message("nothing to accept yet: click on the object first", Qgis.MessageLevel.Info)
            return 0
        layer = self.target_layer or self._default_target_layer()
        features = results.to_layer_features(
            result, self._result_default_crs(), layer.fields(),
            self.source_layer.name() if self.source_layer else "", target_crs=layer.crs(),
            multi=QgsWkbTypes.isMultiType(layer.wkbType()))
        if not results.add_features_undoably(layer, features):
            self.message(f"could not add polygons to {layer.name()} (is it read-only?)",
                         Qgis.MessageLevel.Critical)
            return 0
        layer.triggerRepaint()
        self._accepted.append(Accepted(layer, len(features)))
        self.interaction.accepted()
        self._refresh_overlays()
        self.accepted.emit(len(features))
        return len(features)

    # ------------------------------------------------------------------ text

    def segment_text(self, text: str, task: str) -> None:
        """Referring / reasoning over the visible extent: overlapping tiles rendered at the
        canvas resolution (``tiles.tile_windows``), one ``segment`` request per tile."""
        if not self._ready() or not text.strip():
            return
        hello = self.connection.hello_info
        engine = hello.engine(self._engine_for(task)) if hello is not None else None
        if engine is None or not engine.available:
            reason = engine.reason if engine is not None and engine.reason else "not available"
            self.message("text prompts need the UniGeoSeg engine, which this backend does not "
                         f"offer: {reason}",
                         Qgis.MessageLevel.Warning)
            return
        extent = self.canvas.mapSettings().visibleExtent()
        area = extent_window(crs_to_wire(self._canvas_crs()),
                             (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(),
                              extent.yMaximum()), self.canvas.mapUnitsPerPixel())
        tiles = tile_windows(area, self.settings.tile_size_px)
        run = self.interaction.start_text_run(len(tiles))
        prompt, options = Prompt(text=text, task=task), self._options(self._engine_for(task))
        for index, tile in enumerate(tiles, start=1):
            request = SegmentRequest(prompt, options,
                                     pixels=render_window(self.source_layer, tile.window),
                                     georeference=tile.window.georeference)
            submit(BackendRequestTask(
                f"UniGeoSeg: '{text[:40]}' tile {index}/{len(tiles)}", self.connection, request,
                self.settings.request_timeout_s,
                functools.partial(self._on_text_reply, run, QgsRectangle(*tile.core.extent)),
                functools.partial(self._on_text_error, run)))

    # ------------------------------------------------------------------ internals

    def _ready(self) -> bool:
        if self.source_layer is None or not self.source_layer.isValid():
            self.message("choose a raster layer to segment first", Qgis.MessageLevel.Warning)
            return False
        if not self.connection.is_connected:
            self.message(f"no backend at {self.connection.address}: start or connect it from "
                         f"the UniGeoSeg panel", Qgis.MessageLevel.Warning)
            return False
        return True

    def _window_for(self, canvas_point: QgsPointXY) -> TileWindow | None:
        """The current tile if the point stays on it, else a new tile around the point."""
        current = self.session.window
        if current is not None and self.interaction.keeps_window(
                *self._to_window_crs(canvas_point, current)):
            return current
        try:
            window, pixels, raster = self._new_window(canvas_point)
        except Exception as exc:  # noqa: BLE001 - any provider/render failure: tell, don't crash
            warn(f"reading the tile failed: {exc!r}")
            self.message(f"could not read pixels from {self.source_layer.name()}: {exc}",
                         Qgis.MessageLevel.Critical)
            return None
        self.interaction.move_to(window)
        self._upload(window, pixels, raster)
        return window

    def _new_window(self, canvas_point: QgsPointXY):
        """(window, pixels, raster options) of a new tile around a canvas point: a file
        raster's own pixels, or the layer rendered on the canvas CRS's grid."""
        layer = self.source_layer
        tile_px = self.settings.tile_size_px
        if is_file_raster(layer) and self.settings.pixel_size_map_units <= 0:
            to_layer = QgsCoordinateTransform(self._canvas_crs(), layer.crs(),
                                              QgsProject.instance())
            point = to_layer.transform(canvas_point)
            tile = read_window_around(layer, point.x(), point.y(), tile_px,
                                      bands=display_bands(layer))
            return tile.window, tile.pixels, tile.raster
        resolution = self.settings.pixel_size_map_units or self.canvas.mapUnitsPerPixel()
        window = window_around(crs_to_wire(self._canvas_crs()), canvas_point.x(),
                               canvas_point.y(), resolution, tile_px)
        return window, render_window(layer, window), RasterOptions()

    def _upload(self, window: TileWindow, pixels, raster: RasterOptions) -> None:
        self._set_busy(True)

        def on_reply(reply: SetImageReply) -> None:
            if self.session.window is window:
                log(f"tile {window.width}x{window.height} ready ({reply.embedding})")
                self._set_busy(False)
            if self.interaction.image_ready(window, reply.image_id):
                self._segment()

        def on_error(code: str, text: str) -> None:
            self.interaction.image_failed(window)
            self._on_error(code, text)

        # Encoding can take seconds on a CPU: show it in the task bar, where it can be cancelled.
        submit(BackendRequestTask(
            f"UniGeoSeg: encoding a {window.width} x {window.height} tile", self.connection,
            SetImageRequest(pixels, window.georeference, raster,
                            engine=self._engine_for("interactive")),
            self.settings.request_timeout_s, on_reply, on_error))

    def _segment(self) -> None:
        """Ask for the mask of the current prompts, unless it must wait (coalescing)."""
        if not self.interaction.segment_wanted():
            return
        self._set_busy(True)
        object_key = self.session.object_key
        self.interaction.segment_sent(self.connection.call(
            SegmentRequest(self.session.prompt(), self._options(self._engine_for("interactive")),
                           image_id=self.session.image_id),
            timeout_s=self.settings.request_timeout_s,
            on_reply=lambda reply: self._on_segment_reply(reply, object_key),
            on_error=self._on_segment_error))

    def _on_segment_reply(self, reply: SegmentReply, object_key: str) -> None:
        self._set_busy(False)
        self._show_engine_message(reply)
        if self.interaction.segment_answered(object_key, reply.features):
            self._refresh_overlays()  # source_layer is filled in on accept (to_layer_features)
        if self.interaction.resend:
            self._segment()

    def _on_segment_error(self, code: str, text: str) -> None:
        self.interaction.segment_failed(code)
        self._on_error(code, text)

    def _on_text_reply(self, run: TextRun, core: QgsRectangle, reply: SegmentReply) -> None:
        """Tiles answer one by one: their polygons show as they come (same CRS, the
        canvas's); once every tile has answered they are clipped to the tiles' cores and
        merged across the seams (``results.merge_tile_results``). Each distinct engine
        message shows once per run."""
        if run.messages.is_new(reply.message):
            self._show_engine_message(reply)
        if self.interaction.text_tile_done(run, reply.features, core,
                                           results.merge_tile_results):
            self._refresh_overlays()

    def _on_text_error(self, run: TextRun, code: str, text: str) -> None:
        if self.interaction.text_tile_done(run, None, None, results.merge_tile_results):
            self._refresh_overlays()
        self._on_error(code, text)

    def _on_error(self, code: str, text: str) -> None:
        self._set_busy(False)
        level = (Qgis.MessageLevel.Info if code == ErrorCode.CANCELLED
                 else Qgis.MessageLevel.Warning)
        self.message(f"{text} ({code})", level)

    def _show_engine_message(self, reply: SegmentReply) -> None:
        """The engine's sentence about its answer (why there are no polygons, an assumption),
        when it has one."""
        if reply.message:
            self.message(reply.message, Qgis.MessageLevel.Info)

    def _engine_for(self, task: str) -> str:
        """The engine for ``task``: the preferred one, else the default model when the backend
        offers only that (``vocabulary.default_engine`` over ``hello``'s available engines)."""
        return engine_for(self.connection.hello_info, task)

    def _options(self, engine: str) -> SegmentOptions:
        return SegmentOptions(engine=engine, multimask=True,
                              simplify=self.settings.simplify_map_units,
                              min_area=self.settings.min_area_square_map_units)

    def _result_default_crs(self) -> str:
        """Wire CRS of a result without a ``crs`` member: its window's, else the canvas's."""
        if self.session.window is not None:
            return self.session.window.crs
        return crs_to_wire(self._canvas_crs())

    def _canvas_crs(self) -> QgsCoordinateReferenceSystem:
        return self.canvas.mapSettings().destinationCrs()

    def _transform_to(self, window: TileWindow) -> QgsCoordinateTransform:
        return QgsCoordinateTransform(self._canvas_crs(), crs_from_wire(window.crs),
                                      QgsProject.instance())

    def _to_window_crs(self, canvas_point: QgsPointXY, window: TileWindow) -> tuple[float, float]:
        point = self._transform_to(window).transform(canvas_point)
        return point.x(), point.y()

    def _set_busy(self, busy: bool) -> None:
        self.busyChanged.emit(busy)

    def _refresh_overlays(self) -> None:
        """Redraw the point markers and the preview polygons (canvas CRS)."""
        self._markers.reset(QgsWkbTypes.GeometryType.PointGeometry)
        self._preview.reset(QgsWkbTypes.GeometryType.PolygonGeometry)
        window = self.session.window
        if window is not None:
            crs = crs_from_wire(window.crs)
            for x, y in self.session.points:
                self._markers.addGeometry(QgsGeometry.fromPointXY(QgsPointXY(x, y)), crs)
        result = self.session.result
        if result and result.get("features"):
            source_crs = results.collection_crs(result, self._result_default_crs())
            for geometry in results.geometries_from_collection(result):
                self._preview.addGeometry(geometry, source_crs)
        self.previewChanged.emit()

    def _default_target_layer(self) -> QgsVectorLayer:
        """A new GeoPackage layer next to the project (or in the home folder)."""
        project = QgsProject.instance()
        folder = Path(project.homePath() or Path.home())
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        layer = results.create_geopackage_layer(folder / "unigeoseg_segments.gpkg",
                                                f"segments_{stamp}", self._canvas_crs())
        project.addMapLayer(layer)
        self.target_layer = layer
        self.message(f"new layer {layer.name()} in {folder / 'unigeoseg_segments.gpkg'}",
                     Qgis.MessageLevel.Info)
        return layer

    def remove_overlays(self) -> None:
        scene = self.canvas.scene()
        for band in (self._preview, self._markers):
            scene.removeItem(band)
