"""The plugin's log: its own tab ("UniGeoSeg") in QGIS's Log Messages panel."""

from __future__ import annotations

from qgis.core import Qgis, QgsMessageLog

TAG = "UniGeoSeg"


def log(message: str, level: Qgis.MessageLevel = Qgis.MessageLevel.Info) -> None:
    QgsMessageLog.logMessage(message, TAG, level)


def warn(message: str) -> None:
    log(message, Qgis.MessageLevel.Warning)


def critical(message: str) -> None:
    log(message, Qgis.MessageLevel.Critical)
