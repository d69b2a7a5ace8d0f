"""Processing algorithm "Fine-tune model": teach a backend model the analyst's objects.

From a raster layer and a polygon layer over it (any CRS), the algorithm cuts training chips on
the raster's own grid (``core.finetune_chips``) into a temporary folder, holds out a share of
the polygons for validation in a separate part of the raster, sends the chips to the backend
(``train_upload`` in bounded pieces, or the folder itself to a backend on this machine), starts
the job (``train_start``) and follows it (``train_status``) until it ends, reporting the step,
the loss and the held-out IoU before and after. Cancel stops the job on the backend too
(``train_cancel``), which then registers nothing. The analyst's layers and files are never
written; the chip folder is removed when the run ends.

The QGIS side of the chips lives here, reusable by a dialog: :func:`training_polygons` reads
and reprojects the polygons (``QgsCoordinateTransform``, vertex by vertex, into the raster
CRS), :func:`build_chip_set` reads the pixels through the plugin's window reader and writes
the chip set.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsCsException,
    QgsDistanceArea,
    QgsFeature,
    QgsFeatureRequest,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsGeometryCollection,
    QgsPointXY,
    QgsPolygon,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingFeatureSource,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsRasterLayer,
    QgsUnitTypes,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from ..core.finetune_chips import (
    ChipInputError,
    ChipPlan,
    ChipSetSummary,
    RasterGeoreference,
    TrainingObject,
    map_to_pixels,
    plan_chips,
    tile_rgb8,
    write_chip_set,
)
from ..core.raster_read import display_bands
from ..core.raster_window import RasterGrid, RasterWindowError, read_window
from ..core.settings import PluginSettings
from ..unigeoseg_protocol.errors import ErrorCode, RemoteError, RequestTimeout
from ..unigeoseg_protocol.operations import (
    MAX_UPLOAD_CHUNK_BYTES,
    TrainCancelRequest,
    TrainJobReply,
    TrainStartRequest,
    TrainStatusRequest,
    TrainUploadRequest,
)
from ..unigeoseg_protocol.vocabulary import is_model_name
from .backend_session import BackendSession, Cancelled, remote_error_message
from .base import UniGeoSegAlgorithm, tr

#: Polygons read from a layer at the most (masks need every one; chips sample them).
MAX_POLYGONS_READ = 50_000
#: Seconds between two ``train_status`` questions.
STATUS_POLL_S = 0.5
#: Seconds to wait for a cancelled job to end on the backend.
CANCEL_WAIT_S = 30.0
#: Hosts whose backend shares this machine's files: it reads the chip folder directly.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


# ------------------------------------------------------------------ polygons

@dataclass
class PolygonReport:
    """What reading the polygon layer found, besides the polygons.

    Attributes:
        read: features read; repaired: invalid geometries made valid (``makeValid``);
        skipped_invalid: geometries that stayed invalid or empty; skipped_instruction:
        features whose instruction field is empty; not_reprojected: geometries that
        cannot be transformed into the raster CRS; reprojected_from: the layer's CRS when it
        is not the raster's (its polygons were reprojected).
    """

    read: int = 0
    repaired: int = 0
    skipped_invalid: int = 0
    skipped_instruction: int = 0
    not_reprojected: int = 0
    reprojected_from: str | None = None

    def messages(self) -> list[str]:
        notes = []
        if self.reprojected_from:
            notes.append(f"the polygons ({self.reprojected_from}) were reprojected into the "
                         f"raster's CRS")
        if self.repaired:
            notes.append(f"{self.repaired} invalid geometry(ies) repaired")
        if self.skipped_invalid:
            notes.append(f"{self.skipped_invalid} empty or unrepairable geometry(ies) skipped")
        if self.skipped_instruction:
            notes.append(f"{self.skipped_instruction} feature(s) without an instruction in "
                         f"the field skipped")
        if self.not_reprojected:
            notes.append(f"{self.not_reprojected} geometry(ies) could not be reprojected into "
                         f"the raster's CRS and were skipped")
        return notes


def _ring_xy(ring) -> np.ndarray:
    return np.array([(p.x(), p.y()) for p in ring.points()], dtype=np.float64).reshape(-1, 2)


def _polygon_parts(geometry: QgsGeometry) -> list[tuple[np.ndarray, ...]]:
    """The polygon parts of a geometry, however nested (``makeValid`` may return a
    collection holding a multipolygon and lines); lines and points are dropped. Each part
    is ``(exterior, holes...)`` as ``N x 2`` map coordinates; curves are segmentised."""
    parts: list[tuple[np.ndarray, ...]] = []
    pending = [geometry.constGet()]
    while pending:
        item = pending.pop()
        if item is None:
            continue
        if QgsWkbTypes.isCurvedType(item.wkbType()):
            item = item.segmentize()
        if isinstance(item, QgsGeometryCollection):
            pending.extend(item.geometryN(i) for i in reversed(range(item.numGeometries())))
        elif isinstance(item, QgsPolygon) and item.exteriorRing() is not None:
            rings = [item.exteriorRing()] + [item.interiorRing(i)
                                             for i in range(item.numInteriorRings())]
            parts.append(tuple(_ring_xy(ring) for ring in rings))
    return parts


def _features(source, request: QgsFeatureRequest):
    """The features of a layer or a Processing source, invalid geometries included (they
    are repaired here, not refused by the Processing context's geometry check)."""
    if isinstance(source, QgsProcessingFeatureSource):
        return source.getFeatures(
            request, QgsProcessingFeatureSource.Flag.FlagSkipGeometryValidityChecks)
    return source.getFeatures(request)


def training_polygons(source, source_crs: QgsCoordinateReferenceSystem,
                      raster_crs: QgsCoordinateReferenceSystem,
                      transform_context: QgsCoordinateTransformContext,
                      geotransform: tuple[float, ...], instruction_text: str | None,
                      instruction_field: str | None, feedback=None
                      ) -> tuple[list[TrainingObject], PolygonReport]:
    """The polygons of ``source`` as :class:`TrainingObject` in the raster's pixel frame.

    Args:
        source: a feature source (a vector layer or a Processing feature source).
        source_crs, raster_crs: the layer's and the raster's CRS; the polygons are
            transformed vertex by vertex into the raster CRS, then into pixels by the
            raster's GDAL ``geotransform``.
        instruction_text: the instruction of every polygon; or
        instruction_field: the field holding each polygon's instruction.

    Raises:
        ChipInputError: not a polygon layer, no features, more than
            :data:`MAX_POLYGONS_READ`, or the field does not exist.
    """
    if QgsWkbTypes.geometryType(source.wkbType()) != QgsWkbTypes.GeometryType.PolygonGeometry:
        raise ChipInputError("the training layer must hold polygons (it holds "
                             f"{QgsWkbTypes.displayString(source.wkbType()) or 'no geometry'})")
    count = source.featureCount()
    if count == 0:
        raise ChipInputError("the polygon layer has no features: digitise some objects first")
    if count > MAX_POLYGONS_READ:
        raise ChipInputError(f"the polygon layer has {count} features, more than the "
                             f"{MAX_POLYGONS_READ} a fine-tune reads: select fewer, or cut the "
                             f"layer to an area")
    field_index = -1
    if instruction_field:
        field_index = source.fields().lookupField(instruction_field)
        if field_index < 0:
            raise ChipInputError(f"the polygon layer has no field {instruction_field!r}")
    elif not (instruction_text or "").strip():
        raise ChipInputError("give the instruction for these objects (a text, or the field "
                             "holding one per polygon)")
    report = PolygonReport()
    transform = None
    if source_crs != raster_crs:
        transform = QgsCoordinateTransform(source_crs, raster_crs, transform_context)
        report.reprojected_from = source_crs.authid() or source_crs.description()
    objects = []
    request = QgsFeatureRequest()
    if field_index < 0:
        request.setNoAttributes()
    else:
        request.setSubsetOfAttributes([field_index])
    for feature in _features(source, request):
        if feedback is not None and feedback.isCanceled():
            break
        report.read += 1
        if field_index >= 0:
            value = feature.attribute(field_index)
            null = value is None or (isinstance(value, QVariant) and value.isNull())
            name = "" if null else str(value).strip()
            if not name:
                report.skipped_instruction += 1
                continue
        else:
            name = instruction_text.strip()
        geometry = QgsGeometry(feature.geometry())
        if geometry.isNull() or geometry.isEmpty():
            report.skipped_invalid += 1
            continue
        if not geometry.isGeosValid():
            geometry = geometry.makeValid()
            if geometry.isNull() or geometry.isEmpty() or not geometry.isGeosValid():
                report.skipped_invalid += 1
                continue
            report.repaired += 1
        if transform is not None:
            try:
                geometry.transform(transform)
            except QgsCsException:
                report.not_reprojected += 1
                continue
        parts = _polygon_parts(geometry)
        if not parts:
            report.skipped_invalid += 1
            continue
        objects.append(TrainingObject(
            int(feature.id()), name,
            tuple(tuple(map_to_pixels(ring, geotransform) for ring in part) for part in parts)))
    return objects, report


# ------------------------------------------------------------------ chips

def raster_gsd_m(layer: QgsRasterLayer, grid: RasterGrid,
                 transform_context: QgsCoordinateTransformContext) -> float:
    """The ground size of a pixel of ``layer``, metres (measured on the ellipsoid for a
    geographic CRS, at the raster's centre)."""
    window = grid.window
    crs = layer.crs()
    if not crs.isGeographic():
        factor = QgsUnitTypes.fromUnitToUnitFactor(crs.mapUnits(),
                                                   QgsUnitTypes.DistanceUnit.DistanceMeters)
        return float(window.dx * factor)
    area = QgsDistanceArea()
    area.setSourceCrs(crs, transform_context)
    area.setEllipsoid(crs.ellipsoidAcronym() or "EPSG:7030")
    xmin, ymin, xmax, ymax = window.extent
    cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
    return float(area.measureLine(QgsPointXY(cx, cy), QgsPointXY(cx + window.dx, cy)))


@dataclass
class ChipBuild:
    """A chip set written, and what the analyst should be told about it.

    Attributes:
        plan: the polygons, the split and the windows.
        summary: what was written where.
        notes: sentences about the input (reprojection, repairs, sampling, ...).
    """

    plan: ChipPlan
    summary: ChipSetSummary
    notes: list[str] = field(default_factory=list)


def plan_from_layers(raster: QgsRasterLayer, grid: RasterGrid, source,
                     source_crs: QgsCoordinateReferenceSystem,
                     transform_context: QgsCoordinateTransformContext,
                     instruction_text: str | None, instruction_field: str | None,
                     held_out_share: float, feedback=None) -> tuple[ChipPlan, list[str]]:
    """Check the polygons against the raster and plan the chips; nothing is read or
    written yet, so bad input is reported before any work.

    Raises:
        ChipInputError: the polygons cannot make a chip set (the message says why).
    """
    objects, report = training_polygons(source, source_crs, raster.crs(), transform_context,
                                        grid.geotransform, instruction_text,
                                        instruction_field, feedback)
    notes = report.messages()
    if not objects:
        raise ChipInputError(f"none of the {report.read} feature(s) is a usable polygon"
                             + (f" ({'; '.join(notes)})" if notes else ""))
    plan = plan_chips(objects, grid.window.width, grid.window.height, held_out_share)
    notes.extend(plan.prepared.messages())
    if plan.split.on_line:
        notes.append(f"{len(plan.split.on_line)} polygon(s) straddle the line between the "
                     f"training and held-out areas: no chip is centred on them")
    return plan, notes


def build_chip_set(raster: QgsRasterLayer, grid: RasterGrid, plan: ChipPlan, root: Path,
                   transform_context: QgsCoordinateTransformContext, provider=None,
                   feedback=None, on_progress: Callable[[int, int], None] | None = None
                   ) -> ChipSetSummary:
    """Read the windows of ``plan`` from ``raster`` (its display bands, made RGB as the
    service makes a tile) and write the chip set into ``root``."""
    provider = provider or raster.dataProvider().clone()
    bands = display_bands(raster)

    def read_rgb(window):
        col0, row0, width, height = window
        tile = read_window(raster, grid, grid.window.subwindow(col0, row0, width, height),
                           provider=provider, feedback=feedback, bands=bands)
        return tile_rgb8(tile.pixels, tile.raster)

    georeference = RasterGeoreference(grid.window.crs, grid.geotransform,
                                      raster_gsd_m(raster, grid, transform_context))
    return write_chip_set(
        root, plan, read_rgb, georeference,
        is_cancelled=(lambda: feedback.isCanceled()) if feedback is not None else lambda: False,
        on_progress=on_progress or (lambda done, total: None))


# ------------------------------------------------------------------ the algorithm

def _is_local(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in LOCAL_HOSTS


class FineTuneModelAlgorithm(UniGeoSegAlgorithm):
    """Fine-tune a backend model on a polygon layer over a raster; report held-out IoU."""

    POLYGONS = "POLYGONS"
    INSTRUCTION = "INSTRUCTION"
    INSTRUCTION_FIELD = "INSTRUCTION_FIELD"
    BASE = "BASE"
    STEPS = "STEPS"
    MINUTES = "MINUTES"
    HELD_OUT = "HELD_OUT"
    NAME = "NAME"
    SPLIT = "SPLIT"
    ENGINE = "ENGINE"
    BEFORE_IOU = "BEFORE_IOU"
    AFTER_IOU = "AFTER_IOU"

    def name(self) -> str:
        return "finetunemodel"

    def displayName(self) -> str:
        return tr("Fine-tune model")

    def group(self) -> str:
        return tr("Training")

    def groupId(self) -> str:
        return "training"

    def shortHelpString(self) -> str:
        return tr(
            "Teaches a model of the running backend the objects digitised in a polygon layer "
            "over a raster, and reports how well it finds held-out ones before and after.\n\n"
            "Instruction: the text these objects answer (\"greenhouses\"), or a field holding "
            "one per polygon (e.g. a class name). Chips are cut at the raster's native "
            "resolution around and between the polygons; a share of the polygons, in a part "
            "of the raster of their own, is held out to measure the result (the 'Split' output "
            "shows which). Budget: optimizer steps and/or minutes. The new model is offered "
            "by the backend as 'default:<name>' in the panel and in the segmentation "
            "algorithms.\n\n"
            "Your layers and files are not written: the chips live in a temporary folder that "
            "is removed at the end. Cancel stops the job on the backend, which then keeps no "
            "model.")

    def createInstance(self) -> FineTuneModelAlgorithm:
        return FineTuneModelAlgorithm()

    def initAlgorithm(self, config=None) -> None:
        settings = PluginSettings.load()
        self.add_raster_parameter()
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.POLYGONS, tr("Polygons of the objects to learn"),
            [QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterString(
            self.INSTRUCTION, tr("Instruction for these objects"), optional=True))
        self.addParameter(QgsProcessingParameterField(
            self.INSTRUCTION_FIELD, tr("…or the field holding each polygon's instruction"),
            parentLayerParameterName=self.POLYGONS, optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.NAME, tr("Name of the new model")))
        self.addParameter(QgsProcessingParameterString(
            self.BASE, tr("Base model (engine)"), defaultValue="default"))
        self.addParameter(QgsProcessingParameterNumber(
            self.STEPS, tr("Budget: optimizer steps (0 = no step limit)"),
            type=QgsProcessingParameterNumber.Type.Integer, defaultValue=300, minValue=0))
        self.addParameter(QgsProcessingParameterNumber(
            self.MINUTES, tr("Budget: minutes (0 = no time limit)"),
            type=QgsProcessingParameterNumber.Type.Double, defaultValue=0.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.HELD_OUT, tr("Share of the polygons held out for validation"),
            type=QgsProcessingParameterNumber.Type.Double, defaultValue=0.25, minValue=0.05,
            maxValue=0.9))
        backend = QgsProcessingParameterString(self.BACKEND, tr("Backend address"),
                                               defaultValue=settings.backend_address)
        backend.setFlags(backend.flags() | QgsProcessingParameterDefinition.Flag.FlagAdvanced)
        self.addParameter(backend)
        self.addParameter(QgsProcessingParameterFeatureSink(
            self.SPLIT, tr("Training and held-out polygons"),
            QgsProcessing.SourceType.TypeVectorPolygon, optional=True))
        self.addOutput(QgsProcessingOutputString(self.ENGINE, tr("Engine of the new model")))
        self.addOutput(QgsProcessingOutputNumber(self.BEFORE_IOU,
                                                 tr("Held-out IoU before fine-tuning")))
        self.addOutput(QgsProcessingOutputNumber(self.AFTER_IOU,
                                                 tr("Held-out IoU after fine-tuning")))

    def run_segmentation(self, parameters, context, feedback) -> dict[str, Any]:
        name = (self.parameterAsString(parameters, self.NAME, context) or "").strip()
        if not is_model_name(name):
            raise QgsProcessingException(
                "Name the new model with 1 to 64 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit (e.g. 'greenhouses-2026').")
        base = (self.parameterAsString(parameters, self.BASE, context) or "default").strip()
        steps = self.parameterAsInt(parameters, self.STEPS, context)
        minutes = self.parameterAsDouble(parameters, self.MINUTES, context)
        if steps <= 0 and minutes <= 0:
            raise QgsProcessingException("Give a budget: a number of steps, of minutes, or "
                                         "both.")
        source = self.parameterAsSource(parameters, self.POLYGONS, context)
        if source is None:
            raise QgsProcessingException(self.invalidSourceError(parameters, self.POLYGONS))
        text = self.parameterAsString(parameters, self.INSTRUCTION, context)
        field_name = self.parameterAsString(parameters, self.INSTRUCTION_FIELD, context)
        share = self.parameterAsDouble(parameters, self.HELD_OUT, context)
        transform_context = context.transformContext()
        try:
            plan, notes = plan_from_layers(self._layer, self._grid, source, source.sourceCrs(),
                                           transform_context, text, field_name or None,
                                           share, feedback)
        except ChipInputError as exc:
            raise QgsProcessingException(f"Cannot fine-tune on these layers: {exc}.") from exc
        for note in notes:
            feedback.pushWarning(note)
        feedback.pushInfo(
            f"{len(plan.split.train)} training and {len(plan.split.val)} held-out polygon(s), "
            f"{len(plan.chips)} chip window(s) of {plan.chip_px} px; instruction(s): "
            f"{', '.join(plan.classes)}")
        outputs: dict[str, Any] = {}
        split_id = self._write_split(parameters, context, source, plan)
        if split_id is not None:
            outputs[self.SPLIT] = split_id

        with self.open_session(parameters, context, feedback) as session:
            try:
                engine = session.hello().engine(base)
                if not engine.available:
                    raise QgsProcessingException(
                        f"The backend at {session.address} cannot fine-tune {base!r}: "
                        f"{(engine.reason or 'it does not offer that engine').rstrip('.')}.")
                self._check_training_supported(session)
                root = Path(tempfile.mkdtemp(prefix="unigeoseg-chips-"))
                try:
                    self._build(plan, root, context, feedback)
                    if feedback.isCanceled():
                        return outputs
                    reply = self._start(session, root, name, base, steps, minutes, feedback)
                    reply = self._follow(session, reply, feedback)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
            except Cancelled:
                feedback.pushInfo("Cancelled: no model was made")
                return outputs
            except RemoteError as exc:
                raise QgsProcessingException(remote_error_message(exc, session.address)) \
                    from exc
            except RequestTimeout as exc:
                raise QgsProcessingException(
                    f"The backend at {session.address} stopped answering during the "
                    f"fine-tune ({exc}); the job is reported as failed.") from exc
        return self._finish(reply, outputs, feedback)

    def _build(self, plan: ChipPlan, root: Path, context, feedback) -> ChipSetSummary:
        def progress(done: int, total: int) -> None:
            feedback.setProgress(20.0 * done / max(total, 1))

        try:
            summary = build_chip_set(self._layer, self._grid, plan, root,
                                     context.transformContext(), provider=self._provider,
                                     feedback=feedback, on_progress=progress)
        except (ChipInputError, RasterWindowError) as exc:
            raise QgsProcessingException(f"Cannot cut the training chips: {exc}.") from exc
        if summary.skipped_nodata:
            feedback.pushWarning(f"{summary.skipped_nodata} chip(s) left out: mostly nodata")
        feedback.pushInfo(
            f"Chips: {summary.chips.get('train', 0)} training and {summary.chips.get('val', 0)}"
            f" held-out ({summary.records.get('train', 0)} + {summary.records.get('val', 0)} "
            f"records) in {summary.seconds:.1f} s")
        return summary

    def _write_split(self, parameters, context, source, plan: ChipPlan) -> str | None:
        """The polygons used, each with its split, into the optional SPLIT sink."""
        if not parameters.get(self.SPLIT):
            return None
        fields = QgsFields()
        fields.append(QgsField("fid_source", QVariant.LongLong))
        fields.append(QgsField("split", QVariant.String))
        sink, dest_id = self.parameterAsSink(parameters, self.SPLIT, context, fields,
                                             source.wkbType(), source.sourceCrs())
        if sink is None:
            return None
        splits = {**{i: "train" for i in plan.split.train}, **{i: "val" for i in plan.split.val},
                  **{i: "on_line" for i in plan.split.on_line}}
        request = QgsFeatureRequest().setFilterFids(list(splits)).setNoAttributes()
        for feature in _features(source, request):
            out = QgsFeature(fields)
            out.setGeometry(feature.geometry())
            out.setAttributes([int(feature.id()), splits[int(feature.id())]])
            sink.addFeature(out, QgsFeatureSink.Flag.FastInsert)
        return dest_id

    def _check_training_supported(self, session: BackendSession) -> None:
        """Ask for a job that does not exist: a backend that trains answers unknown_job."""
        try:
            session.request(TrainStatusRequest(job="probe"))
        except RemoteError as exc:
            if str(exc.code) == ErrorCode.UNKNOWN_OP.value:
                raise QgsProcessingException(
                    f"The backend at {session.address} has no training operation: update it "
                    f"(`pip install -U unigeoseg-backend`) and restart it.") from exc
            if str(exc.code) != ErrorCode.UNKNOWN_JOB.value:
                raise

    def _start(self, session: BackendSession, root: Path, name: str, base: str, steps: int,
               minutes: float, feedback) -> TrainJobReply:
        budget = {"max_steps": steps if steps > 0 else None,
                  "max_seconds": minutes * 60.0 if minutes > 0 else None}
        if _is_local(session.address):
            try:
                reply = session.request(TrainStartRequest(name=name, base=base,
                                                          chips_dir=str(root), **budget))
                feedback.pushInfo("The backend runs on this machine: it reads the chip folder")
                return reply
            except RemoteError as exc:
                # A backend reachable from other machines takes uploaded chips only.
                if str(exc.code) != ErrorCode.INVALID_ARGUMENT.value \
                        or "train_upload" not in exc.message:
                    raise
        upload = uuid.uuid4().hex
        files = sorted(p for p in root.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        sent, started = 0, time.monotonic()
        for path in files:
            data = path.read_bytes()
            relative = path.relative_to(root).as_posix()
            for offset in range(0, max(len(data), 1), MAX_UPLOAD_CHUNK_BYTES):
                piece = np.frombuffer(data[offset:offset + MAX_UPLOAD_CHUNK_BYTES], np.uint8)
                session.request(TrainUploadRequest(upload, relative, piece, offset))
                sent += piece.size
                feedback.setProgress(20.0 + 10.0 * sent / max(total, 1))
        seconds = max(time.monotonic() - started, 1e-6)
        feedback.pushInfo(f"Uploaded {len(files)} file(s), {total / 1e6:.1f} MB in "
                          f"{seconds:.1f} s ({total / 1e6 / seconds:.1f} MB/s)")
        return session.request(TrainStartRequest(name=name, base=base, upload=upload,
                                                 **budget))

    def _follow(self, session: BackendSession, reply: TrainJobReply,
                feedback) -> TrainJobReply:
        """Follow the job until it ends, reporting its curve; Cancel cancels it."""
        cursor = reply.cursor
        feedback.pushInfo(f"Job {reply.job} {reply.state}: fine-tuning {reply.base} into "
                          f"{reply.name}")
        while not reply.finished:
            if feedback.isCanceled():
                return self._cancel(session, reply)
            # Short waits, so that Cancel is honoured within STATUS_POLL_S.
            time.sleep(STATUS_POLL_S)
            try:
                reply = session.request(TrainStatusRequest(job=reply.job, after=cursor))
            except Cancelled:
                return self._cancel(session, reply)
            cursor = reply.cursor
            for event in reply.events:
                parts = [f"step {event.step}" + (f"/{reply.max_steps}" if reply.max_steps
                                                 else "")]
                if event.loss is not None:
                    parts.append(f"loss {event.loss:.4f}")
                if event.val_iou is not None:
                    parts.append(f"held-out IoU {event.val_iou:.3f}")
                feedback.pushInfo(", ".join(parts))
            if reply.max_steps:
                feedback.setProgress(30.0 + 70.0 * min(reply.step / reply.max_steps, 1.0))
            if reply.eta_s is not None and math.isfinite(reply.eta_s):
                feedback.setProgressText(f"step {reply.step}, about {reply.eta_s:.0f} s left")
        return reply

    def _cancel(self, session: BackendSession, reply: TrainJobReply) -> TrainJobReply:
        """Cancel the job on the backend and wait (bounded) for it to end."""
        session.feedback = _NeverCancelled()
        reply = session.request(TrainCancelRequest(job=reply.job))
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not reply.finished and time.monotonic() < deadline:
            time.sleep(STATUS_POLL_S)
            reply = session.request(TrainStatusRequest(job=reply.job, after=reply.cursor))
        raise Cancelled(reply.job)

    def _finish(self, reply: TrainJobReply, outputs: dict[str, Any],
                feedback) -> dict[str, Any]:
        if reply.state != "succeeded":
            raise QgsProcessingException(
                f"The fine-tune {reply.state}: {reply.message or 'the backend gave no reason'}")
        if reply.before_iou is not None and reply.after_iou is not None:
            feedback.pushInfo(f"Held-out IoU: {reply.before_iou:.3f} before, "
                              f"{reply.after_iou:.3f} after fine-tuning "
                              f"({reply.after_iou - reply.before_iou:+.3f})")
        feedback.pushInfo(f"New model: engine {reply.engine}")
        outputs.update({self.ENGINE: reply.engine, self.BEFORE_IOU: reply.before_iou,
                        self.AFTER_IOU: reply.after_iou})
        feedback.setProgress(100.0)
        return outputs


class _NeverCancelled:
    """Feedback for the requests that cancel a job: those must not be cut short by Cancel."""

    def isCanceled(self) -> bool:  # noqa: N802 - the QgsFeedback name
        return False

    def pushDebugInfo(self, text: str) -> None:  # noqa: N802
        pass
