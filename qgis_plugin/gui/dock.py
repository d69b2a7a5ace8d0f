"""The UniGeoSeg panel: backend status, source and target layers, mode, text, options."""

from __future__ import annotations

from qgis.core import QgsMapLayerProxyModel
from qgis.gui import QgsDoubleSpinBox, QgsMapLayerComboBox
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

MODES = (("click", "Click / box"), ("referring", "Text: referring"),
         ("reasoning", "Text: reasoning"))


class UniGeoSegDock(QDockWidget):
    """Widgets only: every action is a signal the plugin wires to the controller."""

    connectRequested = pyqtSignal()
    startBackendRequested = pyqtSignal()
    textSubmitted = pyqtSignal(str, str)  # text, task
    acceptRequested = pyqtSignal()
    clearRequested = pyqtSignal()
    undoRequested = pyqtSignal()
    modeChanged = pyqtSignal(str)
    optionsChanged = pyqtSignal()
    backendSettingsChanged = pyqtSignal()

    def __init__(self, parent=None):
        super().__init__("UniGeoSeg", parent)
        self.setObjectName("UniGeoSegDock")
        body = QWidget(self)
        layout = QVBoxLayout(body)

        self.status_label = QLabel("Backend: not connected")
        self.status_label.setWordWrap(True)
        self.connect_button = QPushButton("Connect")
        self.start_button = QPushButton("Start local backend")
        status_row = QHBoxLayout()
        status_row.addWidget(self.connect_button)
        status_row.addWidget(self.start_button)
        layout.addWidget(self.status_label)
        layout.addLayout(status_row)

        form = QFormLayout()
        self.source_combo = QgsMapLayerComboBox()
        self.source_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        form.addRow("Source layer", self.source_combo)
        self.mode_combo = QComboBox()
        for key, label in MODES:
            self.mode_combo.addItem(label, key)
        form.addRow("Mode", self.mode_combo)
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("e.g. the warehouse with the blue roof (Enter sends)")
        self.text_edit.setEnabled(False)
        form.addRow("Instruction", self.text_edit)
        self.target_combo = QgsMapLayerComboBox()
        self.target_combo.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer)
        self.target_combo.setAllowEmptyLayer(True)
        self.target_combo.setLayer(None)
        form.addRow("Target layer", self.target_combo)
        self.simplify_spin = QgsDoubleSpinBox()
        self.simplify_spin.setDecimals(3)
        self.simplify_spin.setMaximum(1e6)
        self.simplify_spin.setToolTip("Simplification tolerance, map units of the tile CRS")
        form.addRow("Simplify", self.simplify_spin)
        self.min_area_spin = QgsDoubleSpinBox()
        self.min_area_spin.setDecimals(3)
        self.min_area_spin.setMaximum(1e12)
        self.min_area_spin.setToolTip("Drop polygons smaller than this (square map units)")
        form.addRow("Minimum area", self.min_area_spin)
        self.resolution_spin = QgsDoubleSpinBox()
        self.resolution_spin.setDecimals(4)
        self.resolution_spin.setMaximum(1e6)
        self.resolution_spin.setSpecialValueText("native / canvas")
        self.resolution_spin.setToolTip("Ground resolution of the tiles sent to the model, map "
                                        "units per pixel. 0: a file raster's native resolution, "
                                        "the canvas resolution for online layers")
        form.addRow("Resolution", self.resolution_spin)
        layout.addLayout(form)

        backend_box = QGroupBox("Backend")
        backend_form = QFormLayout(backend_box)
        self.address_edit = QLineEdit()
        self.address_edit.setToolTip("ZeroMQ address of the backend, e.g. tcp://127.0.0.1:5557")
        backend_form.addRow("Address", self.address_edit)
        self.python_edit = QLineEdit()
        self.python_edit.setPlaceholderText("/path/to/venv/bin/python")
        self.python_edit.setToolTip("A Python with the backend installed, to start it locally")
        backend_form.addRow("Python", self.python_edit)
        self.args_edit = QLineEdit()
        self.args_edit.setPlaceholderText("--sam-checkpoint /path/sam_vit_b_01ec64.pth")
        backend_form.addRow("serve options", self.args_edit)
        # CURVE authentication, needed for a backend beyond this machine (both or neither).
        self.server_key_edit = QLineEdit()
        self.server_key_edit.setPlaceholderText("/path/to/server.key (optional)")
        self.server_key_edit.setToolTip("The backend's public CURVE certificate, for a backend "
                                        "that requires authentication")
        backend_form.addRow("Backend key", self.server_key_edit)
        self.client_key_edit = QLineEdit()
        self.client_key_edit.setPlaceholderText("/path/to/analyst.key_secret (optional)")
        self.client_key_edit.setToolTip("Your CURVE certificate with its secret key; its public "
                                        "half must be in the backend's authorised folder")
        backend_form.addRow("Your key", self.client_key_edit)
        layout.addWidget(backend_box)

        buttons = QHBoxLayout()
        self.accept_button = QPushButton("Accept (Enter)")
        self.clear_button = QPushButton("Clear (Esc)")
        self.undo_button = QPushButton("Undo (Ctrl+Z)")
        for button in (self.accept_button, self.clear_button, self.undo_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.hint_label = QLabel("Left click: object · right or Shift click: background · "
                                 "drag: box")
        self.hint_label.setWordWrap(True)
        layout.addWidget(self.hint_label)
        layout.addStretch(1)
        self.setWidget(body)

        self.connect_button.clicked.connect(self.connectRequested)
        self.start_button.clicked.connect(self.startBackendRequested)
        self.accept_button.clicked.connect(self.acceptRequested)
        self.clear_button.clicked.connect(self.clearRequested)
        self.undo_button.clicked.connect(self.undoRequested)
        self.text_edit.returnPressed.connect(self._submit_text)
        self.mode_combo.currentIndexChanged.connect(self._mode_changed)
        self.simplify_spin.valueChanged.connect(self.optionsChanged)
        self.min_area_spin.valueChanged.connect(self.optionsChanged)
        self.resolution_spin.valueChanged.connect(self.optionsChanged)
        for edit in (self.address_edit, self.python_edit, self.args_edit,
                     self.server_key_edit, self.client_key_edit):
            edit.editingFinished.connect(self.backendSettingsChanged)

    @property
    def mode(self) -> str:
        return self.mode_combo.currentData()

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _mode_changed(self) -> None:
        self.text_edit.setEnabled(self.mode != "click")
        self.modeChanged.emit(self.mode)

    def _submit_text(self) -> None:
        if self.mode in ("referring", "reasoning") and self.text_edit.text().strip():
            self.textSubmitted.emit(self.text_edit.text().strip(), self.mode)
