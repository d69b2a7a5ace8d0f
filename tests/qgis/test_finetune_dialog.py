"""The "Fine-tune model" dialog in real QGIS (offscreen), against a real backend whose default
model is a tiny random one: bad input is shown in the dialog before any work; Start fine-tunes
(chips cut and sent, the job followed in a QGIS task) and shows the held-out IoU before and
after and the new engine, which the backend's ``hello`` then lists, while a timer probe finds
no GUI-thread stall of 100 ms or more; Cancel ends the job within seconds with no model.

The fields are set as an analyst sets them and the buttons clicked; every wait processes Qt
events until a condition holds, with a deadline."""

from __future__ import annotations

import time

import pytest

qgis_core = pytest.importorskip("qgis.core")

from qgis.core import QgsProject, QgsVectorLayer  # noqa: E402
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis_plugin.core.finetune_job import Stage  # noqa: E402
from qgis_plugin.gui.finetune_dialog import FineTuneDialog  # noqa: E402
from tests.qgis.test_finetune_processing import (  # noqa: E402, F401 - fixtures shared
    PONDS,
    _geopackage,
    _square,
    _unused_loopback_address,
    polygons,
    raster,
    training_backend,
)

pytestmark = pytest.mark.timeout(180)

#: Milliseconds to wait for a backend's models, and for a job to end.
MODELS_WAIT_MS = 15_000
JOB_WAIT_MS = 120_000
#: The longest the GUI thread may be busy at once, seconds.
MAX_STALL_S = 0.100


class StallProbe:
    """A 5 ms timer on the GUI thread: the longest gap between two of its ticks is the
    longest time the GUI thread was busy with something else."""

    def __init__(self):
        self.longest_s = 0.0
        self._last = time.monotonic()
        self._timer = QTimer()
        self._timer.setInterval(5)
        self._timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.longest_s = max(self.longest_s, now - self._last)
        self._last = now

    def __enter__(self) -> StallProbe:
        self._last = time.monotonic()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.stop()


@pytest.fixture
def fill_dialog(qgis_app, qtbot, raster, polygons):  # noqa: F811 - the shared fixtures
    """Call with a backend address: the dialog with the ponds' fields filled in."""

    def make(address: str, name: str = "ponds", steps: int = 3) -> FineTuneDialog:
        dialog = FineTuneDialog(address)
        qtbot.addWidget(dialog)
        dialog.show()
        dialog.raster_combo.setLayer(raster)
        dialog.polygons_combo.setLayer(polygons)
        dialog.instruction_edit.setText("pond")
        dialog.name_edit.setText(name)
        dialog.steps_spin.setValue(steps)
        return dialog

    return make


def _read_models(qtbot, dialog: FineTuneDialog) -> list[str]:
    """The base models the backend's ``hello`` offers, as the dialog reads them."""
    with qtbot.waitSignal(dialog.baseModelsRead, timeout=MODELS_WAIT_MS) as blocker:
        dialog.refresh_button.click()
    return blocker.args[0]


def _wait_until_ended(qtbot, dialog: FineTuneDialog, timeout_ms: int = JOB_WAIT_MS) -> None:
    qtbot.waitUntil(lambda: dialog.progress.stage.final and dialog.task is None,
                    timeout=timeout_ms)


def test_bad_input_is_shown_in_the_dialog_before_any_work(qtbot, fill_dialog, tmp_path):
    dialog = fill_dialog(_unused_loopback_address(), name="../x")
    dialog.base_combo.addItem("default")
    dialog.start_button.click()
    # Fields are checked at once, on the GUI thread: no task was started.
    assert dialog.task is None and dialog.progress.stage is Stage.REFUSED
    assert "name the new model" in dialog.result_label.text()

    few = QgsVectorLayer(_geopackage(tmp_path / "few.gpkg",
                                     [("pond", _square(*p)) for p in PONDS[:3]]), "few", "ogr")
    QgsProject.instance().addMapLayer(few, False)
    try:
        dialog.name_edit.setText("ponds")
        dialog.polygons_combo.setLayer(few)
        dialog.start_button.click()
        _wait_until_ended(qtbot, dialog, 30_000)
        # The polygons are refused before a backend is looked for (none listens there).
        assert dialog.progress.stage is Stage.REFUSED
        assert "at least 4" in dialog.result_label.text()
        assert "No backend" not in dialog.result_label.text()
    finally:
        QgsProject.instance().removeMapLayer(few.id())


def test_start_fine_tunes_shows_before_and_after_iou_and_the_new_engine_without_stalls(
        qtbot, fill_dialog, training_backend, tmp_path):  # noqa: F811
    dialog = fill_dialog(training_backend.address)
    assert _read_models(qtbot, dialog) == ["default"]
    with StallProbe() as probe:
        started = time.monotonic()
        dialog.start_button.click()
        _wait_until_ended(qtbot, dialog)
        seconds = time.monotonic() - started
    print(f"fine-tune through the dialog: {seconds:.1f} s, longest GUI-thread stall "
          f"{probe.longest_s * 1000:.0f} ms; {dialog.result_label.text()}")
    assert dialog.progress.stage is Stage.SUCCEEDED, dialog.result_label.text()
    assert dialog.progress.before_iou is not None and dialog.progress.after_iou is not None
    assert "before" in dialog.result_label.text() and "after" in dialog.result_label.text()
    assert "New model: default:ponds" in dialog.result_label.text()
    assert dialog.step_label.text() == "3/3" and dialog.progress.curve.points
    assert probe.longest_s < MAX_STALL_S
    assert "default:ponds" in _read_models(qtbot, dialog)


def test_cancel_ends_the_job_within_seconds_and_leaves_no_model(
        qtbot, fill_dialog, training_backend, tmp_path):  # noqa: F811
    dialog = fill_dialog(training_backend.address, steps=5000)
    _read_models(qtbot, dialog)
    dialog.start_button.click()
    qtbot.waitUntil(lambda: dialog.progress.stage is Stage.TRAINING
                    and dialog.progress.step >= 1, timeout=JOB_WAIT_MS)
    pressed = time.monotonic()
    dialog.cancel_button.click()
    _wait_until_ended(qtbot, dialog, 30_000)
    seconds = time.monotonic() - pressed
    print(f"cancel to the end of the job: {seconds:.1f} s")
    assert dialog.progress.stage is Stage.CANCELLED
    assert dialog.result_label.text() == "Cancelled: no model was made"
    assert seconds < 10.0
    assert not (tmp_path / "cache" / "weights" / "finetuned" / "ponds").exists()
    assert "default:ponds" not in _read_models(qtbot, dialog)


def test_the_raster_menu_action_opens_the_dialog_and_unload_removes_both(qgis_iface, qtbot):
    import qgis_plugin

    instance = qgis_plugin.classFactory(qgis_iface)
    instance.settings.backend_address = _unused_loopback_address()
    instance.initGui()
    try:
        assert instance.finetune_action.text() == "Fine-tune model…"
        instance.finetune_action.trigger()
        dialog = instance.finetune_dialog
        assert dialog is not None and dialog.isVisible()
        assert dialog.address == instance.settings.backend_address
        # No backend listens there: the dialog says so instead of offering base models.
        qtbot.waitUntil(lambda: "No backend" in dialog.message_label.text(),
                        timeout=MODELS_WAIT_MS)
        assert dialog.base_combo.count() == 0
    finally:
        instance.unload()
    assert instance.finetune_dialog is None and instance.finetune_action is None
