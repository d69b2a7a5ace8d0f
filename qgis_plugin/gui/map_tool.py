"""Canvas input: clicks become points, drags become boxes, keys accept / clear / undo."""

from __future__ import annotations

from qgis.core import QgsPointXY, QgsRectangle, QgsWkbTypes
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import QEvent, QObject, QRect, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QKeyEvent

DRAG_THRESHOLD_PX = 6  # a press that moves less than this is a click, not a box


class PromptMapTool(QgsMapTool):
    """Left click: foreground point. Right click or Shift+click: background point.
    Left drag: box. Enter: accept. Esc: clear. Ctrl+Z: undo.

    Points are emitted in canvas (project) CRS map coordinates; ``event.mapPoint()`` already
    accounts for canvas rotation.
    """

    pointClicked = pyqtSignal(QgsPointXY, int)  # map point (canvas CRS), label 1 / 0
    boxDrawn = pyqtSignal(QgsRectangle)         # canvas CRS
    acceptRequested = pyqtSignal()
    clearRequested = pyqtSignal()
    undoRequested = pyqtSignal()

    def __init__(self, canvas: QgsMapCanvas):
        super().__init__(canvas)
        #: Set by the plugin: whether Ctrl+Z has something of ours to undo. Only then does
        #: the tool take Ctrl+Z from QGIS's own Undo action (edit-mode undo stays QGIS's).
        self.undo_available = lambda: False
        self._press_pos = None
        self._press_map = None
        self._dragging = False
        self._box_band = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
        self._box_band.setColor(QColor(255, 200, 0, 200))
        self._box_band.setFillColor(QColor(255, 200, 0, 40))
        self._box_band.setWidth(2)
        self.setCursor(Qt.CursorShape.CrossCursor)

    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:
        self._press_pos = event.pos()
        self._press_map = event.mapPoint()
        self._dragging = False

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:
        if self._press_pos is None or not (event.buttons() & Qt.MouseButton.LeftButton):
            return
        moved = (event.pos() - self._press_pos).manhattanLength()
        if moved >= DRAG_THRESHOLD_PX:
            self._dragging = True
            self._box_band.setToCanvasRectangle(QRect(self._press_pos, event.pos()).normalized())

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:
        if self._press_pos is None:
            return
        if self._dragging and event.button() == Qt.MouseButton.LeftButton:
            rect = QgsRectangle(self._press_map, event.mapPoint())
            rect.normalize()
            self._box_band.reset(QgsWkbTypes.GeometryType.PolygonGeometry)
            self.boxDrawn.emit(rect)
        else:
            background = (event.button() == Qt.MouseButton.RightButton
                          or bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier))
            self.pointClicked.emit(event.mapPoint(), 0 if background else 1)
        self._press_pos = self._press_map = None
        self._dragging = False

    def keyPressEvent(self, event: QKeyEvent) -> None:
        key, modifiers = event.key(), event.modifiers()
        if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            self.acceptRequested.emit()
        elif key == Qt.Key.Key_Escape:
            self.clearRequested.emit()
        elif key == Qt.Key.Key_Z and modifiers & Qt.KeyboardModifier.ControlModifier:
            self.undoRequested.emit()
        else:
            event.ignore()  # everything else (snapping keys, pan arrows) stays QGIS's
            return
        event.accept()

    def activate(self) -> None:
        super().activate()
        self.canvas().installEventFilter(self)

    def deactivate(self) -> None:
        self.canvas().removeEventFilter(self)
        self._box_band.reset(QgsWkbTypes.GeometryType.PolygonGeometry)
        super().deactivate()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        """Claim our keys before QGIS's application shortcuts see them.

        Qt offers a key to shortcuts first (ShortcutOverride); accepting that event turns it
        into a key press for the canvas, hence for :meth:`keyPressEvent`.
        """
        if event.type() == QEvent.Type.ShortcutOverride and self._claims(event):
            event.accept()
            return True
        return False

    def _claims(self, event: QKeyEvent) -> bool:
        key, modifiers = event.key(), event.modifiers()
        if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter, Qt.Key.Key_Escape):
            return True
        return (key == Qt.Key.Key_Z and modifiers == Qt.KeyboardModifier.ControlModifier
                and self.undo_available())

    def remove_rubber_bands(self) -> None:
        self.canvas().scene().removeItem(self._box_band)

