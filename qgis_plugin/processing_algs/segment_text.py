"""Processing algorithm "Segment by text prompt": an instruction, tiled over an extent.

It needs the backend's text engine (``unigeoseg``, a model given to ``serve --model``); a
backend without one says so in its ``hello`` (``engines.unigeoseg.available`` false, with a
reason), and this algorithm stops with that reason before reading any pixel.

Each tile is segmented on its own; the tiles abut on the raster grid, and at the end polygons
cut by tile edges are merged back into one (``core.results.merge_tile_results``).
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterString,
)

from ..core.raster_window import RasterWindowError, read_window
from ..core.results import merge_tile_results
from ..core.settings import PluginSettings
from ..unigeoseg_protocol.errors import RemoteError
from ..unigeoseg_protocol.params import MAX_TEXT_CHARS, Prompt, SegmentOptions
from .segment_points import (
    SKIPPABLE_CODES,
    Cancelled,
    UniGeoSegAlgorithm,
    features_from_result,
    remote_error_message,
    tr,
)

TASKS = ("referring", "reasoning")


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
            "next to the rail yard\") with the UniGeoSeg text engine of a running backend.\n\n"
            "Task: 'referring' (the instruction names the objects) or 'reasoning' (it needs "
            "reasoning to find them). The extent (default: the whole raster) is cut into tiles "
            "of 'Tile size' pixels at the raster's native resolution, clipped to the raster; "
            "each tile is segmented on its own and polygons cut by tile edges are merged back "
            "into one. Polygons are written in the raster's CRS.\n\n"
            "The text engine is not part of the current backend version: the algorithm then "
            "stops with the backend's explanation. Use 'Segment by points' meanwhile.")

    def createInstance(self) -> SegmentByTextAlgorithm:
        return SegmentByTextAlgorithm()

    def initAlgorithm(self, config=None) -> None:
        settings = PluginSettings.load()
        self.add_raster_parameter()
        self.addParameter(QgsProcessingParameterString(
            self.PROMPT, tr("Instruction"), multiLine=True))
        self.addParameter(QgsProcessingParameterEnum(
            self.TASK, tr("Task"), options=list(TASKS), defaultValue=0))
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
        task = TASKS[self.parameterAsEnum(parameters, self.TASK, context)]
        tile_px = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        extent = self.parameterAsExtent(parameters, self.EXTENT, context, self._crs)
        if extent is None or extent.isNull():
            extent = None  # the whole raster
        options = SegmentOptions(
            engine="unigeoseg",
            simplify=max(self.parameterAsDouble(parameters, self.SIMPLIFY, context), 0.0),
            min_area=max(self.parameterAsDouble(parameters, self.MIN_AREA, context), 0.0))

        with self.open_session(parameters, context, feedback) as session:
            try:
                hello = session.hello()
            except Cancelled:
                return {}
            engine = (hello.get("engines") or {}).get("unigeoseg") or {}
            if not engine.get("available", False):
                reason = engine.get("reason") or "the backend does not offer it"
                raise QgsProcessingException(
                    f"The UniGeoSeg text engine is not available in the backend at "
                    f"{session.address} yet ({reason.rstrip('.')}). Text prompts need a "
                    f"backend with the text engine; use 'Segment by points' meanwhile.")
            windows = self._grid.windows_over(extent, tile_px)
            if not windows:
                raise QgsProcessingException("The extent does not overlap the raster.")
            sink, dest_id, fields = self.open_sink(parameters, context)
            prompt = Prompt(text=text, task=task)
            feedback.pushInfo(f"{len(windows)} tile(s) of at most {tile_px} px")
            tile_results = []
            for index, (col0, row0, width, height) in enumerate(windows):
                if feedback.isCanceled():
                    break
                try:
                    result = self._segment_tile(session, parameters, prompt, options,
                                                (col0, row0, width, height), feedback)
                except Cancelled:
                    break
                if result is not None:
                    tile_results.append((result["features"], None))
                feedback.setProgress(100.0 * (index + 1) / len(windows))
        # The tiles abut on the raster grid: objects cut by a tile edge are merged back.
        merged = merge_tile_results(tile_results)
        features = features_from_result({"features": merged}, fields, self._layer_name)
        self.write(sink, features, parameters)
        if feedback.isCanceled():
            feedback.pushInfo("Cancelled: the output holds the polygons of the tiles done")
        feedback.pushInfo(f"{len(features)} polygon(s) written")
        return {self.OUTPUT: dest_id}

    def _segment_tile(self, session, parameters, prompt, options, tile, feedback):
        """Segment one tile: the backend's result, or None when the tile is skipped."""
        col0, row0, width, height = tile
        try:
            window = read_window(self._layer, self._grid, col0, row0, width, height,
                                 provider=self._provider, feedback=feedback)
        except RasterWindowError as exc:
            feedback.reportError(f"Tile at pixel ({col0}, {row0}): {exc}; skipped", False)
            return None
        try:
            return session.segment(window, prompt, options)
        except RemoteError as exc:
            if str(exc.code) in SKIPPABLE_CODES:
                feedback.pushInfo(f"Tile at pixel ({col0}, {row0}): {exc.message}; skipped")
                return None
            raise QgsProcessingException(remote_error_message(exc, session.address)) from exc
