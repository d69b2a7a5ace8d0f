"""The plugin object QGIS loads: actions, panel, map tool, Processing provider, backend link.

Everything here is wiring; the logic lives in controller.py and core/. ``unload()`` removes
every action, dock, map tool, provider, rubber band, socket and process this file creates.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from qgis.core import Qgis, QgsApplication, QgsTask
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from . import deps
from .core.log import log
from .core.settings import PluginSettings

if TYPE_CHECKING:
    from .unigeoseg_protocol.operations import HelloReply

PLUGIN_DIR = Path(__file__).resolve().parent
MENU = "&UniGeoSeg"


def icon(name: str) -> QIcon:
    """Icons sit in icons/ next to the package (zip) or at the repo top level (development)."""
    for folder in (PLUGIN_DIR / "icons", PLUGIN_DIR.parent / "icons"):
        if (folder / name).exists():
            return QIcon(str(folder / name))
    return QIcon()


class UniGeoSegPlugin:
    """Created by ``classFactory(iface)``."""

    def __init__(self, iface):
        self.iface = iface
        self.settings = PluginSettings.load()
        self.action = None
        self.dock = None
        self.map_tool = None
        self.controller = None
        self.connection = None
        self.launcher = None
        self.provider = None
        self.install_action = None
        self.install_task = None
        self.finetune_action = None
        self.finetune_dialog = None

    # ------------------------------------------------------------------ QGIS hooks

    def initProcessing(self) -> None:
        from .processing_algs.provider import UniGeoSegProvider

        self.provider = UniGeoSegProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()
        self.action = QAction(icon("unigeoseg.svg"), "UniGeoSeg segmentation",
                              self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.toggled.connect(self._toggle)
        self.iface.addRasterToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)
        self.install_action = QAction("Install dependencies (pyzmq)", self.iface.mainWindow())
        self.install_action.triggered.connect(self.install_dependencies)
        self.iface.addPluginToRasterMenu(MENU, self.install_action)
        self.finetune_action = QAction("Fine-tune model…", self.iface.mainWindow())
        self.finetune_action.triggered.connect(self.show_finetune_dialog)
        self.iface.addPluginToRasterMenu(MENU, self.finetune_action)

    def unload(self) -> None:
        if self.map_tool is not None:
            if self.iface.mapCanvas().mapTool() is self.map_tool:
                self.iface.mapCanvas().unsetMapTool(self.map_tool)
            self.map_tool.remove_rubber_bands()
            self.map_tool.deleteLater()
            self.map_tool = None
        if self.controller is not None:
            self.controller.remove_overlays()
            self.controller.deleteLater()
            self.controller = None
        if self.dock is not None:
            # The dock is deleted later; until then its layer combos still emit when layers
            # leave the project, and must not reach the controller that is gone.
            for combo in (self.dock.source_combo, self.dock.target_combo):
                combo.layerChanged.disconnect()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.finetune_dialog is not None:
            self.finetune_dialog.close()  # cancels a fine-tune that runs
            self.finetune_dialog.deleteLater()
            self.finetune_dialog = None
        from .tasks import cancel_all

        cancel_all()
        if self.connection is not None:
            self.connection.close()
            self.connection.deleteLater()
            self.connection = None
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher.deleteLater()
            self.launcher = None
        if self.install_task is not None:
            self.install_task.cancel()
            self.install_task = None
        for menu_action in (self.install_action, self.finetune_action):
            if menu_action is not None:
                self.iface.removePluginRasterMenu(MENU, menu_action)
                menu_action.deleteLater()
        self.install_action = self.finetune_action = None
        if self.action is not None:
            self.iface.removeRasterToolBarIcon(self.action)
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.action.deleteLater()
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        self.install_action = None
        self.install_task = None

    # ------------------------------------------------------------------ panel and tool

    def _toggle(self, checked: bool) -> None:
        if checked:
            self.show_panel()
        elif self.dock is not None:
            self.dock.hide()
            self.iface.mapCanvas().unsetMapTool(self.map_tool)

    def show_panel(self) -> bool:
        """Build the panel, map tool and controller on first use; False if pyzmq is missing."""
        if self.dock is None and not self._build():
            return False
        self.dock.show()
        self.iface.mapCanvas().setMapTool(self.map_tool)
        return True

    def _build(self) -> bool:
        missing = deps.missing_dependencies()
        if missing:
            self._offer_install(missing)
            return False
        from .connection import BackendConnection
        from .controller import SegmentationController
        from .gui.dock import UniGeoSegDock
        from .gui.map_tool import PromptMapTool

        canvas = self.iface.mapCanvas()
        self.connection = BackendConnection(self.settings.backend_address,
                                            curve=self._curve_keys())
        self.controller = SegmentationController(canvas, self.connection, self.settings,
                                                 self._message)
        self.dock = UniGeoSegDock(self.iface.mainWindow())
        self.map_tool = PromptMapTool(canvas)
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self._wire()
        self.connection.open()
        return True

    def _wire(self) -> None:
        dock, controller, tool = self.dock, self.controller, self.map_tool
        tool.pointClicked.connect(controller.add_point)
        tool.boxDrawn.connect(controller.set_box)
        tool.acceptRequested.connect(controller.accept)
        tool.clearRequested.connect(controller.clear)
        tool.undoRequested.connect(controller.undo)
        tool.undo_available = controller.can_undo
        dock.acceptRequested.connect(controller.accept)
        dock.clearRequested.connect(controller.clear)
        dock.undoRequested.connect(controller.undo)
        dock.textSubmitted.connect(controller.segment_text)
        dock.connectRequested.connect(self._reconnect)
        dock.startBackendRequested.connect(self._start_backend)
        dock.source_combo.layerChanged.connect(controller.set_source_layer)
        dock.target_combo.layerChanged.connect(self._target_changed)
        dock.simplify_spin.setValue(self.settings.simplify_map_units)
        dock.min_area_spin.setValue(self.settings.min_area_square_map_units)
        dock.resolution_spin.setValue(self.settings.pixel_size_map_units)
        dock.address_edit.setText(self.settings.backend_address)
        dock.python_edit.setText(self.settings.backend_python)
        dock.args_edit.setText(self.settings.backend_args)
        dock.server_key_edit.setText(self.settings.curve_server_public_file)
        dock.client_key_edit.setText(self.settings.curve_client_secret_file)
        # Connected after the initial values, so that showing the panel saves nothing.
        dock.optionsChanged.connect(self._options_changed)
        dock.backendSettingsChanged.connect(self._backend_settings_changed)
        controller.set_source_layer(dock.source_combo.currentLayer())
        self.connection.connected.connect(self._on_connected)
        self.connection.disconnected.connect(self._on_disconnected)

    def _target_changed(self, layer) -> None:
        if self.controller is not None:
            self.controller.target_layer = layer

    def _options_changed(self) -> None:
        self.settings.simplify_map_units = self.dock.simplify_spin.value()
        self.settings.min_area_square_map_units = self.dock.min_area_spin.value()
        self.settings.pixel_size_map_units = self.dock.resolution_spin.value()
        self.settings.save()

    def _backend_settings_changed(self) -> None:
        address = self.dock.address_edit.text().strip()
        self.settings.backend_python = self.dock.python_edit.text().strip()
        self.settings.backend_args = self.dock.args_edit.text().strip()
        keys = (self.dock.server_key_edit.text().strip(),
                self.dock.client_key_edit.text().strip())
        changed = bool(address) and (
            address != self.settings.backend_address
            or keys != (self.settings.curve_server_public_file,
                        self.settings.curve_client_secret_file))
        if changed:
            self.settings.backend_address = address
            self.settings.curve_server_public_file, self.settings.curve_client_secret_file = keys
        self.settings.save()
        if changed:  # a new address or new keys mean a new connection
            self.connection.close()
            self.connection.deleteLater()
            from .connection import BackendConnection

            self.connection = BackendConnection(address, curve=self._curve_keys())
            self.controller.connection = self.connection
            self.connection.connected.connect(self._on_connected)
            self.connection.disconnected.connect(self._on_disconnected)
            self.connection.open()

    def _curve_keys(self):
        """The CURVE keys of the settings (None: none set, or unusable, which is said)."""
        from .core.curve import CurveKeyError, curve_keys

        try:
            return curve_keys(self.settings)
        except CurveKeyError as exc:
            self._message(f"{exc}; connecting without authentication",
                          Qgis.MessageLevel.Warning)
            return None

    # ------------------------------------------------------------------ fine-tune

    def show_finetune_dialog(self) -> None:
        """The "Fine-tune model" dialog, on the backend of the settings; its base models are
        read from the backend each time it is shown."""
        from .core.curve import CurveKeyError, curve_keys
        from .gui.finetune_dialog import FineTuneDialog

        try:
            curve = curve_keys(self.settings)
        except CurveKeyError as exc:
            self._message(str(exc), Qgis.MessageLevel.Critical)
            return
        if self.finetune_dialog is None:
            self.finetune_dialog = FineTuneDialog(self.settings.backend_address, curve,
                                                  self.iface.mainWindow())
        elif self.finetune_dialog.task is None:  # the settings may have changed meanwhile
            self.finetune_dialog.address = self.settings.backend_address
            self.finetune_dialog.curve = curve
        self.finetune_dialog.show()
        self.finetune_dialog.raise_()
        self.finetune_dialog.read_base_models()

    # ------------------------------------------------------------------ dependencies

    def _offer_install(self, missing: list[str]) -> None:
        """A message bar entry with a one-click install button."""
        from qgis.PyQt.QtWidgets import QPushButton

        bar = self.iface.messageBar()
        item = bar.createMessage("UniGeoSeg", f"missing Python packages: {', '.join(missing)} "
                                 f"(installed into a plugin-private folder, not into QGIS's "
                                 f"own Python)")
        button = QPushButton("Install")
        button.clicked.connect(self.install_dependencies)
        item.layout().addWidget(button)
        bar.pushWidget(item, Qgis.MessageLevel.Warning, 0)

    def install_dependencies(self) -> None:
        """pip-install pyzmq into the plugin's private folder, in a cancellable QGIS task
        (never into QGIS's own Python)."""
        missing = deps.missing_dependencies()
        if not missing:
            self._message("all dependencies are installed", Qgis.MessageLevel.Success)
            return
        if not deps.privately_installable(missing):
            self._message(deps.explain_missing(missing), Qgis.MessageLevel.Critical)
            return

        def run(task):
            return deps.install_private(task)

        def done(exception, result=None):
            self.install_task = None
            if exception is None and result and result[0]:
                self._message("pyzmq installed; open the UniGeoSeg panel again",
                              Qgis.MessageLevel.Success)
            else:
                detail = result[1] if result else repr(exception)
                log(detail, Qgis.MessageLevel.Critical)
                self._message("installing pyzmq failed; see the UniGeoSeg log",
                              Qgis.MessageLevel.Critical)

        self.install_task = QgsTask.fromFunction("UniGeoSeg: install pyzmq", run,
                                                 on_finished=done)
        QgsApplication.taskManager().addTask(self.install_task)

    # ------------------------------------------------------------------ backend

    def _reconnect(self) -> None:
        self.connection.close()
        self.connection.open()

    def _start_backend(self) -> None:
        if not self.settings.backend_python:
            self._message("set the backend's Python (a venv with unigeoseg installed) in the "
                          "plugin settings first", Qgis.MessageLevel.Warning)
            return
        from .launcher import BackendLauncher

        if self.launcher is None:
            self.launcher = BackendLauncher()
            self.launcher.started.connect(lambda address: self._reconnect())
            self.launcher.failed.connect(lambda reason: self._message(
                f"the backend did not start: {reason}", Qgis.MessageLevel.Critical))
        self.launcher.start(self.settings.backend_python, self.settings.backend_address,
                            shlex.split(self.settings.backend_args))

    def _on_connected(self, hello: HelloReply) -> None:
        engines = [f"{name} ({info.model or 'not loaded'})"
                   for name, info in hello.engines.items() if info.available]
        device = hello.device + (f" ({hello.gpu.get('name')})" if hello.gpu else "")
        text = (f"Backend: connected to {self.connection.address}<br>engines: "
                f"{', '.join(engines) or 'none'} · device: {device}")
        self.dock.set_status(text)
        log(f"connected: {hello.to_result()}")

    def _on_disconnected(self, reason: str) -> None:
        if self.dock is not None:
            self.dock.set_status(f"Backend: not connected ({reason})")
        self._message(reason, Qgis.MessageLevel.Warning)

    def _message(self, text: str, level=Qgis.MessageLevel.Info) -> None:
        self.iface.messageBar().pushMessage("UniGeoSeg", text, level=level, duration=5)
        log(text, level)

