"""The "Fine-tune model" dialog (Raster > UniGeoSeg): a raster, a polygon layer of the objects
to learn, their instruction, a base model, a step budget, the held-out share and the new
model's name; Start runs the fine-tune as a QGIS task and shows its step, loss, held-out IoU,
ETA and loss curve; at the end, the held-out IoU before and after and the new engine.

The work is the "Fine-tune model" Processing algorithm's (``processing_algs/finetune.py``):
the same polygon checks, chips, upload and job calls. Here it runs in a ``QgsTask`` worker
thread; the GUI thread only takes the polygon layer's thread-safe copy when Start is pressed
and updates labels from the task's signals, so QGIS stays responsive.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsFieldProxyModel,
    QgsMapLayerProxyModel,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsTask,
    QgsVectorLayerFeatureSource,
)
from qgis.gui import QgsFieldComboBox, QgsMapLayerComboBox
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QPointF, Qt, pyqtSignal
from qgis.PyQt.QtGui import QPainter, QPalette, QPen, QPolygonF
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.finetune_chips import ChipInputError
from ..core.finetune_job import JobProgress, LossCurve, Stage, base_models, field_problems
from ..core.log import log
from ..core.raster_window import RasterWindowError, raster_grid
from ..processing_algs.backend_session import BackendSession, Cancelled, remote_error_message
from ..processing_algs.finetune import (
    STATUS_POLL_S,
    FineTuneModelAlgorithm,
    build_chip_set,
    plan_from_layers,
)
from ..unigeoseg_protocol.errors import RemoteError, RequestTimeout
from ..unigeoseg_protocol.operations import TrainJobReply, TrainStatusRequest

#: Seconds a backend has to answer one request of the job (uploads, start, status).
REQUEST_TIMEOUT_S = 120.0


class PolygonSnapshot:
    """A polygon layer readable from a worker thread, as ``training_polygons`` reads a
    source: QGIS's thread-safe copy of its features (``QgsVectorLayerFeatureSource``), with
    its type, count and fields taken on the GUI thread."""

    def __init__(self, layer):
        self._features = QgsVectorLayerFeatureSource(layer)
        self._wkb_type = layer.wkbType()
        self._count = layer.featureCount()
        self._fields = layer.fields()

    def wkbType(self):  # noqa: N802 - the QgsFeatureSource names training_polygons calls
        return self._wkb_type

    def featureCount(self) -> int:  # noqa: N802
        return self._count

    def fields(self):
        return self._fields

    def getFeatures(self, request):  # noqa: N802
        return self._features.getFeatures(request)


class _TaskFeedback(QgsProcessingFeedback):
    """The feedback the Processing helpers report to: progress goes to the task (the task
    bar), sentences to the dialog; Cancel on the task cancels it."""

    def __init__(self, task: FineTuneTask):
        super().__init__()
        self._task = task

    def setProgress(self, progress: float) -> None:  # noqa: N802 - QgsFeedback API
        self._task.setProgress(progress)

    def pushInfo(self, info: str) -> None:  # noqa: N802
        self._task.noted.emit(info)

    def pushWarning(self, warning: str) -> None:  # noqa: N802
        self._task.noted.emit(warning)

    def pushDebugInfo(self, info: str) -> None:  # noqa: N802
        pass


class FineTuneTask(QgsTask):
    """One fine-tune: check and plan the polygons, cut the chips into a temporary folder,
    send them, start the job and follow it until it ends (or Cancel cancels it on the
    backend). Signals reach the dialog on the GUI thread.

    Signals:
        staged(Stage, str): a new stage, with the reason for a refused or failed one.
        noted(str): a sentence for the analyst (reprojection, repairs, upload speed, ...).
        reported(TrainJobReply): every reply about the job.
    """

    staged = pyqtSignal(object, str)
    noted = pyqtSignal(str)
    reported = pyqtSignal(object)

    def __init__(self, raster, polygons, instruction_text: str | None,
                 instruction_field: str | None, base: str, steps: int, held_out_share: float,
                 name: str, address: str, curve=None):
        super().__init__(f"UniGeoSeg: fine-tune {name}", QgsTask.Flag.CanCancel)
        # GUI thread: what the worker reads is taken now (the layers may change later).
        self._raster = raster
        self._grid = raster_grid(raster)
        self._raster_provider = raster.dataProvider().clone()
        self._polygons = PolygonSnapshot(polygons)
        self._polygons_crs = polygons.crs()
        self._transform_context = QgsProject.instance().transformContext()
        self._instruction = (instruction_text, instruction_field)
        self._base, self._steps, self._share, self._name = base, steps, held_out_share, name
        self._address, self._curve = address, curve
        self._job_calls = FineTuneModelAlgorithm()  # the upload, start and cancel of the job
        self.feedback = _TaskFeedback(self)
        self._woken = threading.Event()

    def cancel(self) -> None:
        """Any thread: the worker notices within a poll and cancels the job on the backend."""
        self.feedback.cancel()
        self._woken.set()
        super().cancel()

    def run(self) -> bool:
        """Worker thread."""
        try:
            return self._run()
        except Exception as exc:  # noqa: BLE001 - reported to the analyst, never raised in QGIS
            log(f"fine-tune failed: {exc!r}", Qgis.MessageLevel.Critical)
            self.staged.emit(Stage.FAILED, f"{exc}")
            return False

    def _run(self) -> bool:
        self.staged.emit(Stage.PREPARING, "")
        text, field_name = self._instruction
        try:
            plan, notes = plan_from_layers(self._raster, self._grid, self._polygons,
                                           self._polygons_crs, self._transform_context, text,
                                           field_name, self._share, self.feedback)
        except ChipInputError as exc:
            self.staged.emit(Stage.REFUSED, f"cannot fine-tune on these layers: {exc}")
            return False
        for note in notes:
            self.noted.emit(note)
        self.noted.emit(f"{len(plan.split.train)} training and {len(plan.split.val)} held-out "
                        f"polygon(s), {len(plan.chips)} chip window(s) of {plan.chip_px} px")
        try:
            with BackendSession(self._address, self.feedback, REQUEST_TIMEOUT_S,
                                self._curve) as session:
                return self._train(session, plan)
        except Cancelled:
            self.staged.emit(Stage.CANCELLED, "")
        except (QgsProcessingException, ChipInputError, RasterWindowError) as exc:
            self.staged.emit(Stage.FAILED, str(exc))
        except RemoteError as exc:
            self.staged.emit(Stage.FAILED, remote_error_message(exc, self._address))
        except RequestTimeout as exc:
            self.staged.emit(Stage.FAILED, f"the backend at {self._address} stopped "
                                           f"answering ({exc})")
        return False

    def _train(self, session: BackendSession, plan) -> bool:
        engine = session.hello().engine(self._base)
        if not engine.available:
            raise QgsProcessingException(
                f"the backend cannot fine-tune {self._base!r}: "
                f"{engine.reason or 'it does not offer that engine'}")
        self._job_calls._check_training_supported(session)
        root = Path(tempfile.mkdtemp(prefix="unigeoseg-chips-"))
        try:
            build_chip_set(self._raster, self._grid, plan, root, self._transform_context,
                           provider=self._raster_provider, feedback=self.feedback,
                           on_progress=lambda done, total: self.setProgress(
                               20.0 * done / max(total, 1)))
            if self.isCanceled():
                raise Cancelled("before the job started")
            self.staged.emit(Stage.STARTING, "")
            reply = self._job_calls._start(session, root, self._name, self._base,
                                           self._steps, 0.0, self.feedback)
            self.reported.emit(reply)
            reply = self._follow(session, reply)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return reply.state == "succeeded"

    def _follow(self, session: BackendSession, reply: TrainJobReply) -> TrainJobReply:
        while not reply.finished:
            # Woken at once by Cancel, so that the job is cancelled within a poll.
            self._woken.wait(STATUS_POLL_S)
            try:
                if self.isCanceled():
                    raise Cancelled(reply.job)
                reply = session.request(TrainStatusRequest(job=reply.job, after=reply.cursor))
            except Cancelled:
                # Cancels the job on the backend, waits (bounded) until it ended, raises.
                self._job_calls._cancel(session, reply)
            self.reported.emit(reply)
            if reply.max_steps:
                self.setProgress(30.0 + 70.0 * min(reply.step / reply.max_steps, 1.0))
        return reply


class LossCurveWidget(QWidget):
    """The training loss against the step, drawn as a line (QPainter)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.curve = LossCurve()
        self.setMinimumSize(280, 110)

    def set_curve(self, curve: LossCurve) -> None:
        self.curve = curve
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), self.palette().color(QPalette.ColorRole.Base))
        points = self.curve.scaled(self.width(), self.height())
        if len(points) >= 2:
            painter.setPen(QPen(self.palette().color(QPalette.ColorRole.Highlight), 1.5))
            painter.drawPolyline(QPolygonF([QPointF(x, y) for x, y in points]))
        elif not points:
            painter.setPen(self.palette().color(QPalette.ColorRole.PlaceholderText))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "loss curve")
        painter.end()


class FineTuneDialog(QDialog):
    """Widgets and the task's signals; the work is :class:`FineTuneTask`'s.

    Args:
        address: the backend's ZeroMQ address; curve: its CURVE keys (None: none).
    """

    #: The job ended (the final JobProgress), on the GUI thread.
    jobEnded = pyqtSignal(object)
    #: The backend's base models were (re)read: the list of engines.
    baseModelsRead = pyqtSignal(list)

    def __init__(self, address: str, curve=None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("UniGeoSeg: fine-tune model")
        self.address, self.curve = address, curve
        self.progress = JobProgress()
        self.task: FineTuneTask | None = None
        self._hello_task = None

        form = QFormLayout()
        self.raster_combo = QgsMapLayerComboBox()
        self.raster_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        form.addRow("Raster", self.raster_combo)
        self.polygons_combo = QgsMapLayerComboBox()
        self.polygons_combo.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer)
        form.addRow("Polygons of the objects", self.polygons_combo)
        self.instruction_edit = QLineEdit()
        self.instruction_edit.setPlaceholderText("e.g. greenhouses")
        form.addRow("Instruction", self.instruction_edit)
        self.field_combo = QgsFieldComboBox()
        self.field_combo.setFilters(QgsFieldProxyModel.Filter.String)
        self.field_combo.setAllowEmptyFieldName(True)
        self.field_combo.setLayer(self.polygons_combo.currentLayer())
        self.field_combo.setToolTip("A field holding each polygon's instruction (e.g. a class "
                                    "name); used instead of the text when set")
        self.polygons_combo.layerChanged.connect(self.field_combo.setLayer)
        form.addRow("…or the field", self.field_combo)
        base_row = QHBoxLayout()
        self.base_combo = QComboBox()
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("Ask the backend which models it offers")
        base_row.addWidget(self.base_combo, 1)
        base_row.addWidget(self.refresh_button)
        form.addRow("Base model", base_row)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(300)
        form.addRow("Training steps", self.steps_spin)
        self.held_out_spin = QDoubleSpinBox()
        self.held_out_spin.setRange(0.05, 0.9)
        self.held_out_spin.setSingleStep(0.05)
        self.held_out_spin.setValue(0.25)
        self.held_out_spin.setToolTip("Share of the polygons held out, in a part of the raster "
                                      "of their own, to measure the result")
        form.addRow("Held-out share", self.held_out_spin)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("e.g. greenhouses-2026")
        form.addRow("New model name", self.name_edit)

        self.message_label = QLabel()
        self.message_label.setWordWrap(True)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        numbers = QFormLayout()
        self.stage_label, self.step_label = QLabel(Stage.IDLE.value), QLabel("—")
        self.loss_label, self.iou_label, self.eta_label = QLabel("—"), QLabel("—"), QLabel("—")
        numbers.addRow("Stage", self.stage_label)
        numbers.addRow("Step", self.step_label)
        numbers.addRow("Loss", self.loss_label)
        numbers.addRow("Held-out IoU", self.iou_label)
        numbers.addRow("Time left", self.eta_label)
        self.curve_widget = LossCurveWidget()
        self.result_label = QLabel()
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.close_button = QPushButton("Close")
        for button in (self.start_button, self.cancel_button, self.close_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.message_label)
        layout.addWidget(self.progress_bar)
        layout.addLayout(numbers)
        layout.addWidget(self.curve_widget)
        layout.addWidget(self.result_label)
        layout.addLayout(buttons)

        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.close_button.clicked.connect(self.close)
        self.refresh_button.clicked.connect(self.read_base_models)

    # ------------------------------------------------------------------ base models

    def read_base_models(self) -> None:
        """Ask the backend's ``hello`` for its models, in a task (it may take seconds)."""
        if self._hello_task is not None:
            return
        address, curve = self.address, self.curve

        def ask(task):
            with BackendSession(address, QgsProcessingFeedback(), REQUEST_TIMEOUT_S,
                                curve) as session:
                return base_models(session.hello().engines)

        def done(exception, names=None):
            if sip.isdeleted(self):
                return  # the dialog went with the plugin while the backend was asked
            self._hello_task = None
            if exception is not None or names is None:
                self.message_label.setText(f"{exception or 'no answer from the backend'}")
                return
            chosen = self.base_combo.currentText()
            self.base_combo.clear()
            self.base_combo.addItems(names)
            if chosen in names:
                self.base_combo.setCurrentText(chosen)
            self.baseModelsRead.emit(names)

        self._hello_task = QgsTask.fromFunction("UniGeoSeg: read the backend's models", ask,
                                                on_finished=done)
        QgsApplication.taskManager().addTask(self._hello_task)

    # ------------------------------------------------------------------ the job

    def start(self) -> None:
        """Check the fields, then run the fine-tune as a task (no-op while one runs)."""
        if self.task is not None:
            return
        raster, polygons = self.raster_combo.currentLayer(), self.polygons_combo.currentLayer()
        name = self.name_edit.text().strip()
        problems = field_problems(name, self.base_combo.currentText(), self.steps_spin.value(),
                                  raster is not None, polygons is not None)
        self.progress = JobProgress()
        self._show_numbers()
        self.curve_widget.set_curve(self.progress.curve)
        self.result_label.clear()
        if problems:
            self.progress.move_to(Stage.REFUSED, "; ".join(problems))
            self._show_end()
            return
        field_name = self.field_combo.currentField() or None
        self.message_label.clear()
        self.task = FineTuneTask(raster, polygons, self.instruction_edit.text(), field_name,
                                 self.base_combo.currentText(), self.steps_spin.value(),
                                 self.held_out_spin.value(), name, self.address, self.curve)
        self.task.staged.connect(self._on_stage)
        self.task.noted.connect(self._on_note)
        self.task.reported.connect(self._on_reply)
        self.task.progressChanged.connect(self._on_task_progress)
        self.task.taskCompleted.connect(self._on_task_ended)
        self.task.taskTerminated.connect(self._on_task_ended)
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        QgsApplication.taskManager().addTask(self.task)

    def cancel(self) -> None:
        if self.task is not None:
            self.cancel_button.setEnabled(False)
            self.stage_label.setText("cancelling…")
            self.task.cancel()

    def _on_task_progress(self, percent: float) -> None:
        self.progress_bar.setValue(int(percent))

    def _on_stage(self, stage: Stage, reason: str) -> None:
        if self.progress.stage.final or stage is self.progress.stage:
            return  # a job's own reply said first how it ended
        self.progress.move_to(stage, reason or None)
        self.stage_label.setText(stage.value)

    def _on_note(self, text: str) -> None:
        notes = [line for line in self.message_label.text().split("\n") if line]
        self.message_label.setText("\n".join([*notes[-4:], text]))

    def _on_reply(self, reply: TrainJobReply) -> None:
        self.progress.apply(reply)
        self._show_numbers()
        self.curve_widget.set_curve(self.progress.curve)

    def _on_task_ended(self) -> None:
        self.task = None
        if not self.progress.stage.final:  # ended without saying how: Cancel before the job
            self.progress.move_to(Stage.CANCELLED)
        self._show_end()
        if self.progress.stage is Stage.SUCCEEDED:
            self.read_base_models()  # the new model is a base model now

    def _show_numbers(self) -> None:
        numbers = self.progress.numbers_text()
        self.stage_label.setText(self.progress.stage.value)
        self.step_label.setText(numbers["step"])
        self.loss_label.setText(numbers["loss"])
        self.iou_label.setText(numbers["iou"])
        self.eta_label.setText(numbers["eta"])

    def _show_end(self) -> None:
        self._show_numbers()
        self.result_label.setText(self.progress.result_text())
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.jobEnded.emit(self.progress)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        """Closing the dialog cancels a job that runs (it would otherwise run unseen)."""
        self.cancel()
        super().closeEvent(event)
