"""What happens between a click and a polygon in a layer (GUI thread, never blocking).

The controller turns map-tool events into prompts on a tile, keeps the tile (and so the
backend's cached embedding) while later clicks stay inside it, previews each result as a
rubber band, and writes accepted polygons through the target layer's edit buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

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
from .core.log import log, warn
from .core.raster_read import display_bands, is_file_raster
from .core.raster_window import read_window_around
from .core.render import render_window
from .core.session import PromptSession
from .core.settings import PluginSettings
from .core.tiles import TileWindow, tiles_and_cores_over_extent, window_around
from .tasks import BackendRequestTask, submit

#: A click this close to a window edge gets a new window centred on it (context matters).
EDGE_MARGIN_PX = 32


@dataclass
class Accepted:
    """One accepted result, for undo."""

    layer: QgsVectorLayer
    feature_count: int


@dataclass
class _TextRun:
    """One text request over the visible extent: tile results so far, tiles still out."""

    pending: int
    tiles: list[tuple[dict[str, Any], QgsRectangle]] = field(default_factory=list)


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
        self.session = PromptSession()
        self._accepted: list[Accepted] = []
        self._text_run: _TextRun | None = None
        self._in_flight: str | None = None
        self._resend = False
        self._preview = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
        self._preview.setColor(QColor(0, 200, 255, 230))
        self._preview.setFillColor(QColor(0, 200, 255, 60))
        self._preview.setWidth(2)
        self._markers = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PointGeometry)
        self._markers.setIconSize(8)

    # ------------------------------------------------------------------ inputs

    def set_source_layer(self, layer: QgsRasterLayer | None) -> None:
        if layer is not self.source_layer:
            self.source_layer = layer
            self.session = PromptSession()
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
        if self._in_flight is not None:
            request_id, self._in_flight = self._in_flight, None
            self.connection.cancel(request_id)
        self._resend = False
        self._text_run = None
        self.session.next_object()
        self._refresh_overlays()

    def accept(self) -> int:
        """Write the previewed polygons into the target layer; returns how many."""
        result = self.session.result
        if not result or not result.get("features"):
            self.message("nothing to accept yet: click on the object first", Qgis.MessageLevel.Info)
            return 0
        layer = self.target_layer or self._default_target_layer()
        source_crs = results.collection_crs(result, self._result_default_crs())
        features = results.to_layer_features(result, source_crs, layer,
                                             self.source_layer.name() if self.source_layer
                                             else "")
        if not results.add_features_undoably(layer, features):
            self.message(f"could not add polygons to {layer.name()} (is it read-only?)",
                         Qgis.MessageLevel.Critical)
            return 0
        layer.triggerRepaint()
        self._accepted.append(Accepted(layer, len(features)))
        self._text_run = None  # tiles still on their way belong to the accepted result
        self.session.next_object()
        self._refresh_overlays()
        self.accepted.emit(len(features))
        return len(features)

    # ------------------------------------------------------------------ text

    def segment_text(self, text: str, task: str) -> None:
        """Referring / reasoning over the visible extent, tiled at the canvas resolution."""
        if not self._ready() or not text.strip():
            return
        engine = (self.connection.hello_info or {}).get("engines", {}).get("unigeoseg", {})
        if not engine.get("available"):
            self.message("text prompts need the UniGeoSeg engine, which this backend does not "
                         f"offer: {engine.get('reason', 'not available')}",
                         Qgis.MessageLevel.Warning)
            return
        crs = self.canvas.mapSettings().destinationCrs()
        extent = self.canvas.mapSettings().visibleExtent()
        tiles = tiles_and_cores_over_extent(crs.authid() or crs.toWkt(),
                                            (extent.xMinimum(), extent.yMinimum(),
                                             extent.xMaximum(), extent.yMaximum()),
                                            self.canvas.mapUnitsPerPixel(),
                                            self.settings.tile_px)
        self.session.new_window(None)  # text results are not tied to a click window
        run = self._text_run = _TextRun(pending=len(tiles))
        for index, (window, core) in enumerate(tiles, start=1):
            pixels = render_window(self.source_layer, window)
            submit(BackendRequestTask(
                f"UniGeoSeg: '{text[:40]}' tile {index}/{len(tiles)}", self.connection,
                "segment", {"georeference": self._georeference(window),
                            "prompt": {"text": text, "task": task},
                            "options": dict(self._options(), engine="unigeoseg")},
                {"pixels": pixels}, self.settings.request_timeout_s,
                functools.partial(self._on_text_reply, run, QgsRectangle(*core)),
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
        """The current tile if the point is well inside it, else a new tile around the point."""
        current = self.session.window
        if current is not None:
            x, y = self._to_window_crs(canvas_point, current)
            # A first click near the edge gets a window centred on it; later clicks on the
            # same object stay on its window wherever they fall inside it (a window at the
            # raster's border cannot be centred anyway).
            margin = EDGE_MARGIN_PX if self.session.is_empty else 0.0
            if current.contains(x, y, margin):
                return current
        try:
            window, pixels, raster = self._new_window(canvas_point)
        except Exception as exc:  # noqa: BLE001 - any provider/render failure: tell, don't crash
            warn(f"reading the tile failed: {exc!r}")
            self.message(f"could not read pixels from {self.source_layer.name()}: {exc}",
                         Qgis.MessageLevel.Critical)
            return None
        self.session.new_window(window)
        self._upload(window, pixels, raster)
        return window

    def _new_window(self, canvas_point: QgsPointXY):
        layer = self.source_layer
        tile_px = self.settings.tile_px
        if is_file_raster(layer) and self.settings.ground_resolution <= 0:
            to_layer = QgsCoordinateTransform(self._canvas_crs(), layer.crs(),
                                              QgsProject.instance())
            point = to_layer.transform(canvas_point)
            native = read_window_around(layer, point.x(), point.y(), tile_px,
                                        bands=display_bands(layer))
            gt = native.georeference.geotransform
            window = TileWindow(crs=native.georeference.crs, x0=gt[0], y0=gt[3],
                                pixel_size=gt[1], width=native.width, height=native.height)
            return window, native.pixels, native.raster.to_wire()
        crs = self._canvas_crs()
        resolution = self.settings.ground_resolution or self.canvas.mapUnitsPerPixel()
        window = window_around(crs.authid() or crs.toWkt(), canvas_point.x(), canvas_point.y(),
                               resolution, tile_px)
        return window, render_window(layer, window), {"stretch": "auto"}

    def _upload(self, window: TileWindow, pixels, raster: dict[str, Any]) -> None:
        self._set_busy(True)
        window_key = window

        def on_reply(message) -> None:
            if self.session.window is window_key:
                self.session.image_id = message.header["result"]["image_id"]
                log(f"tile {window.width}x{window.height} ready "
                    f"({message.header['result']['embedding']})")
                self._set_busy(False)
                if self._resend or not self.session.is_empty:
                    self._resend = False
                    self._segment()

        def on_error(code: str, text: str) -> None:
            if self.session.window is window_key:  # the next click uploads the tile again
                self.session.window = None
                self._resend = False
            self._on_error(code, text)

        # Encoding can take seconds on a CPU: show it in the task bar, where it can be cancelled.
        submit(BackendRequestTask(
            f"UniGeoSeg: encoding a {window.width} x {window.height} tile", self.connection,
            "set_image", {"georeference": self._georeference(window), "raster": raster,
                          "engine": "sam"},
            {"pixels": pixels}, self.settings.request_timeout_s, on_reply, on_error))

    def _segment(self) -> None:
        """Ask for the mask of the current prompts; coalesces clicks made while waiting."""
        if self.session.image_id is None or self._in_flight is not None:
            self._resend = True
            return
        if self.session.is_empty:
            return
        self._resend = False
        self._set_busy(True)
        object_key = self.session.object_key
        self._in_flight = self.connection.request(
            "segment", {"image_id": self.session.image_id, "prompt": self.session.prompt_wire(),
                        "options": self._options()},
            timeout_s=self.settings.request_timeout_s,
            on_reply=lambda message: self._on_segment_reply(message, object_key),
            on_error=self._on_segment_error)

    def _on_segment_reply(self, message, object_key: str) -> None:
        self._in_flight = None
        self._set_busy(False)
        if object_key != self.session.object_key:
            # The prompts changed meanwhile (undo, accept, clear): this answer is stale.
            if self._resend and not self.session.is_empty:
                self._segment()
            return
        self.session.result = message.header["result"]["features"]
        for feature in self.session.result["features"]:
            feature["properties"]["source_layer"] = self.source_layer.name()
        self._refresh_overlays()
        if self._resend:
            self._segment()

    def _on_segment_error(self, code: str, text: str) -> None:
        self._in_flight = None
        if code == "unknown_image":  # the backend was restarted or evicted the tile
            self.session.window = None
        self._on_error(code, text)

    def _on_text_reply(self, run: _TextRun, core: QgsRectangle, message) -> None:
        """Tiles answer one by one: their polygons show as they come (same CRS, the
        canvas's); once every tile has answered they are clipped to the tiles' cores and
        merged across the seams (``results.merge_tile_results``)."""
        if run is not self._text_run:
            return  # a newer text request, or the result was accepted or cleared
        run.tiles.append((message.header["result"]["features"], core))
        self._text_tile_done(run)

    def _on_text_error(self, run: _TextRun, code: str, text: str) -> None:
        if run is self._text_run:
            self._text_tile_done(run)
        self._on_error(code, text)

    def _text_tile_done(self, run: _TextRun) -> None:
        """The preview: the tiles' polygons as they are, then merged once all have answered."""
        run.pending -= 1
        if run.tiles:
            first, _ = run.tiles[0]
            self.session.result = (
                results.merge_tile_results(run.tiles) if run.pending == 0 else
                {**first, "features": [f for tile, _ in run.tiles for f in tile["features"]]})
        self._refresh_overlays()

    def _on_error(self, code: str, text: str) -> None:
        self._set_busy(False)
        level = Qgis.MessageLevel.Info if code == "cancelled" else Qgis.MessageLevel.Warning
        self.message(f"{text} ({code})", level)

    def _options(self) -> dict[str, Any]:
        return {"engine": "sam", "multimask": True, "simplify": self.settings.simplify,
                "min_area": self.settings.min_area}

    @staticmethod
    def _georeference(window: TileWindow) -> dict[str, Any]:
        return {"crs": window.crs, "geotransform": list(window.geotransform)}

    def _result_default_crs(self) -> str:
        """CRS of a result without a ``crs`` member: its window's, else the canvas's."""
        if self.session.window is not None:
            return self.session.window.crs
        crs = self._canvas_crs()
        return crs.authid() or crs.toWkt()

    def _canvas_crs(self) -> QgsCoordinateReferenceSystem:
        return self.canvas.mapSettings().destinationCrs()

    def _transform_to(self, window: TileWindow) -> QgsCoordinateTransform:
        return QgsCoordinateTransform(self._canvas_crs(), QgsCoordinateReferenceSystem(window.crs),
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
            crs = QgsCoordinateReferenceSystem(window.crs)
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

    def preview_geometries(self) -> list[QgsGeometry]:
        """The previewed polygons in canvas CRS (for tests and the dock's summary)."""
        return [self._preview.asGeometry()] if self._preview.numberOfVertices() else []

    def remove_overlays(self) -> None:
        scene = self.canvas.scene()
        for band in (self._preview, self._markers):
            scene.removeItem(band)
