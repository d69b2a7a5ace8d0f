"""Render one layer alone into a tile window (GUI thread): for XYZ, WMS and other online or
fileless layers, whose pixels only exist once QGIS draws them."""

from __future__ import annotations

import numpy as np
from qgis.core import (
    QgsMapLayer,
    QgsMapRendererCustomPainterJob,
    QgsMapSettings,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter

from .crs import crs_from_wire
from .tiles import TileWindow


def render_window(layer: QgsMapLayer, window: TileWindow) -> np.ndarray:
    """Draw ``layer`` (and nothing else: no labels, no other layers) over ``window``.

    Returns:
        ``H x W x 4`` uint8 RGBA; alpha 0 where the layer drew nothing (the backend treats
        those pixels as nodata).
    """
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(crs_from_wire(window.crs))
    settings.setExtent(QgsRectangle(*window.extent))
    settings.setOutputSize(QSize(window.width, window.height))
    settings.setOutputDpi(96)
    settings.setBackgroundColor(QColor(0, 0, 0, 0))
    settings.setFlag(QgsMapSettings.Flag.DrawLabeling, False)
    settings.setFlag(QgsMapSettings.Flag.Antialiasing, False)
    # Rendered in this thread: a parallel job would wait for the global thread pool, whose
    # threads may all be held by our own request tasks waiting for replies that only this
    # (blocked) GUI thread can deliver, a deadlock once tiles outnumber the pool's threads.
    image = QImage(QSize(window.width, window.height), QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    try:
        QgsMapRendererCustomPainterJob(settings, painter).renderSynchronously()
    finally:
        painter.end()
    image = image.convertToFormat(QImage.Format.Format_RGBA8888)
    if image.width() != window.width or image.height() != window.height:
        raise RuntimeError(f"QGIS rendered {image.width()} x {image.height()} pixels for a "
                           f"{window.width} x {window.height} window")
    buffer = image.constBits()
    buffer.setsize(image.sizeInBytes())
    rows = np.frombuffer(buffer, np.uint8).reshape(window.height, image.bytesPerLine())
    return rows[:, :window.width * 4].reshape(window.height, window.width, 4).copy()
