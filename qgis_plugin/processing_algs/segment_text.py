"""Processing algorithm "Segment by text prompt": an instruction, tiled over an extent.

It needs the backend's text engine (``unigeoseg``, a model given to ``serve --model``); a
backend without one says so in its ``hello`` (``engines.unigeoseg.available`` false, with a
reason), and this algorithm stops with that reason before reading any pixel.

The extent is cut into overlapping tiles on the raster's grid, as the panel and the CLI cut
theirs (``core.tiles.tile_windows``): each tile is segmented on its own, its polygons are
clipped to its core, and at the end polygons cut by the cores' edges are merged back into one
(``core.results.merge_tile_results``).
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterString,
    QgsRectangle,
)

from ..core.engine_choice import engine_for
from ..core.raster_window import RasterWindowError
from ..core.results import merge_tile_results
from ..core.settings import PluginSettings
from ..core.tiles import TileWindow, tile_windows
from ..unigeoseg_protocol.params import MAX_TEXT_CHARS, Prompt, SegmentOptions
from ..unigeoseg_protocol.vocabulary import TEXT_TASKS
from .backend_session import Cancelled
from .base import UniGeoSegAlgorithm, tr


class SegmentByTextAlgorithm(UniGeoSegAlgorithm):
    """Segment what an instruction describes, tile by tile over an extent of a raster."""

    PROMPT = "PROMPT"
    TASK = "TASK"
    EXTENT = "EXTENT"

    def name(self) -> str:
        return "segmentbytext"

    def displayName(self) -> str:
        return tr("Segment by text prompt")

    def shortHelpString(self) -> str:
        return tr(
            "Segments what a text instruction describes (\"the warehouse with the blue roof "
            "next to the rail yard\") with the UniGeoSeg text engine of a running backend (or "
            "the default model when the backend offers only that).\n\n"
            "Task: 'referring' (the instruction names the objects) or 'reasoning' (it needs "
            "reasoning to find them). The extent (default: the whole raster) is cut into "
            "overlapping tiles of 'Tile size' pixels at the raster's native resolution, clipped "
            "to the raster; each tile is segmented on its own, and polygons of neighbouring "
            "tiles are merged where they meet. Polygons are written in the raster's CRS.\n\n"
            "The backend needs the UniGeoSeg text engine: start it with a model, "
            "`unigeoseg serve --model PATH`. A backend without one is reported with its reason "
            "before any pixel is read.")

    def createInstance(self) -> SegmentByTextAlgorithm:
        return SegmentByTextAlgorithm()

    def initAlgorithm(self, config=None) -> None:
        settings = PluginSettings.load()
        self.add_raster_parameter()
        self.addParameter(QgsProcessingParameterString(
            self.PROMPT, tr("Instruction"), multiLine=True))
        self.addParameter(QgsProcessingParameterEnum(
            self.TASK, tr("Task"), options=list(TEXT_TASKS), defaultValue=0))
        self.addParameter(QgsProcessingParameterExtent(
            self.EXTENT, tr("Extent (default: the whole raster)"), optional=True))
        self.add_backend_parameters(settings)
        self.add_vector_options(settings, advanced=True)
        self.add_output_parameter()

    def run_segmentation(self, parameters, context, feedback) -> dict[str, Any]:
        text = (self.parameterAsString(parameters, self.PROMPT, context) or "").strip()
        if not text:
            raise QgsProcessingException("Write an instruction in 'Instruction'.")
        if len(text) > MAX_TEXT_CHARS:
            raise QgsProcessingException(f"The instruction is longer than {MAX_TEXT_CHARS} "
                                         f"characters.")
        task = TEXT_TASKS[self.parameterAsEnum(parameters, self.TASK, context)]
        tile_px = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, self._crs)
        if extent is None or extent.isNull():
            extent = None  # the whole raster
        simplify = max(self.parameterAsDouble(parameters, self.SIMPLIFY, context), 0.0)
        min_area = max(self.parameterAsDouble(parameters, self.MIN_AREA, context), 0.0)

        with self.open_session(parameters, context, feedback) as session:
            try:
                hello = session.hello()
            except Cancelled:
                return {}
            engine_name = engine_for(hello, task)
            engine = hello.engines.get(engine_name)
            if engine is None or not engine.available:
                reason = (engine.reason if engine is not None else None) \
                    or "the backend does not offer it"
                raise QgsProcessingException(
                    f"The UniGeoSeg text engine is not available in the backend at "
                    f"{session.address} ({reason.rstrip('.')}). Text prompts need a backend "
                    f"started with a text model: `unigeoseg serve --model PATH`.")
            options = SegmentOptions(engine=engine_name, simplify=simplify, min_area=min_area)
            area = (self._grid.window if extent is None else self._grid.window.covering(
                extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()))
            if area is None:
                raise QgsProcessingException("The extent does not overlap the raster.")
            tiles = tile_windows(area, tile_px)
            sink, dest_id, fields = self.open_sink(parameters, context)
            prompt = Prompt(text=text, task=task)
            feedback.pushInfo(f"{len(tiles)} overlapping tile(s) of at most {tile_px} px")
            tile_results = []
            for index, tile in enumerate(tiles):
                if feedback.isCanceled():
                    break
                try:
                    reply = self._segment_tile(session, prompt, options, tile.window,
                                               feedback)
                except Cancelled:
                    break
                if reply is not None:
                    tile_results.append((reply.features, QgsRectangle(*tile.core.extent)))
                feedback.setProgress(100.0 * (index + 1) / len(tiles))
        # Polygons are clipped to their tile's core, and objects cut by a core's edge merged.
        merged = merge_tile_results(tile_results)
        written = self.write_result(sink, fields, merged, parameters)
        if feedback.isCanceled():
            feedback.pushInfo("Cancelled: the output holds the polygons of the tiles done")
        feedback.pushInfo(f"{written} polygon(s) written")
        return {self.OUTPUT: dest_id}

    def _segment_tile(self, session, prompt, options, window: TileWindow, feedback):
        """Segment one tile: the backend's reply, or None when the tile is skipped."""
        where = f"Tile at pixel ({window.col0}, {window.row0})"
        try:
            tile = self.read(window, feedback)
        except RasterWindowError as exc:
            feedback.reportError(f"{where}: {exc}; skipped", False)
            return None
        return self.segment_or_skip(session, tile, prompt, options, where, feedback)
